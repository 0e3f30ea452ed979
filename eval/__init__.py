"""Evaluation: COCO-30K prompt/reference sets, distributed generation, FID / IS / CLIP score / PickScore."""
