"""The ConText-CIR network: open_clip towers, the cross-attention fusion head, pooling and projection."""
