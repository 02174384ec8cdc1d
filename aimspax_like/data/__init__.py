"""Reference-labelled frames and their durable storage.

Import-light on purpose (numpy, h5py, ASE only): label workers and ``status`` use this package
and must never pay for torch, MACE or Parsl.
"""

from aimspax_like.data.frames import LabelledFrame, reference_fingerprint
from aimspax_like.data.store import DatasetStore
from aimspax_like.data.xyz import export_extxyz, import_extxyz

__all__ = ["DatasetStore", "LabelledFrame", "export_extxyz", "import_extxyz", "reference_fingerprint"]
