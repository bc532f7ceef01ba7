"""Models: U-ViT for diffusion, timm classifiers. None of them knows about distribution."""
from dpt_scale.models.classifier import ImageClassifier, build_classifier, load_classifier
from dpt_scale.models.uvit import UVIT_SIZES, UViT, build_uvit

__all__ = ["UVIT_SIZES", "ImageClassifier", "UViT", "build_classifier", "build_uvit", "load_classifier"]
