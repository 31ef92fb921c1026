"""Region features (VG Faster R-CNN, 36 boxes) and the Arrow feature store. Not implemented yet (issue 3)."""
