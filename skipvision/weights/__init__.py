"""Reading pretrained weights into skipvision's components, strictly (docs/checkpoints.md)."""
