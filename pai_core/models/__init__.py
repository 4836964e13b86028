"""Model zoo. Each family module registers its models on import; a new model is one new
module plus one import line below."""
from pai_core.models import conv, lenet, resnet_cifar, vgg  # noqa: F401  (registers models)
from pai_core.models.registry import build_model, model_names, register

__all__ = ["build_model", "model_names", "register"]
