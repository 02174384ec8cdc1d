"""Judging a trained model after the campaign: ``aimspax-like validate`` and ``aimspax-like testset``.

A campaign's own summary reports the errors it measured while it ran. Validation asks the
questions a user has afterwards, of any MACE file and any labelled test set: how large are the
errors per temperature and per element (``errors``), does MD with the model stay physical for
longer than active learning ever ran it (``stability``, the aims-PAX paper's Table III), does it
sample the same structure as the reference (``rdf``), and what do the errors look like
(``plots``). ``testdata`` reads the frames to judge, ``predict`` evaluates the model file,
``report`` puts the answers together into ``report/validation.json``; ``fps`` and
``make_testset`` build a new held-out test set; ``commands`` is their command-line front.

Like ``aimspax_like.models``, importing this package imports nothing heavy: the submodules
that need torch or MACE import it themselves.
"""
