"""The methods beside ConText-CIR (DESIGN section 13): textual inversion (phi), CVSI and TisCIR.

Their networks and training objectives run on the same engine as ConText (Ray + DeepSpeed, checkpoints, resume,
TensorBoard) with the CLIP towers frozen; the eval job scores them through `training.evaluation.methods`.
"""
