"""Data: GLUE task definitions and metrics (``glue``), reading GLUE files in every layout or from the hub
(``glue_files``), the GLUE LightningDataModule (``glue_datamodule``), and what data modules share:
unpadded datasets, per-batch padding, epoch-seeded shuffling and the held-out search split
(``batching``), and where the training stream stands, for resuming mid-epoch (``resume``). Room for
text/LM data beside them. May import :mod:`coalora.pretrained` and the helpers."""
