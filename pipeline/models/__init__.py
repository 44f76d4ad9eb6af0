from pipeline.models.unet import ConditionalUNet

__all__ = ["ConditionalUNet"]
