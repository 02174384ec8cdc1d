"""The MACE committee, its continual training and foundation-model calculators.

Deliberately empty of imports: ``import aimspax_like.models`` must not pull in torch or MACE
(label workers and the CLI import the package tree). Import the submodules instead:
``models.ensemble`` (MACEEnsemble, EnsemblePrediction), ``models.training`` (EnsembleTrainer,
MemberMetrics), ``models.foundation`` (load_foundation_calculator).
"""
