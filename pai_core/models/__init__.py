"""Model zoo. Each family module registers its models on import; a new model is one new
module plus one import line below."""
from pai_core.models import conv, lenet, mobilenet, resnet_cifar, resnet_imagenet, vgg, wrn  # noqa: F401  (registers models)
from pai_core.models.registry import ModelInfo, build_model, model_info, model_names, register

__all__ = ["ModelInfo", "build_model", "model_info", "model_names", "register"]
