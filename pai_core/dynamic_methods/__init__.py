"""Dynamic sparse training methods (`dynamic.method`). Adding one: a file here with its
Params and `@register`, and an import line below."""
from pai_core.dynamic_methods.registry import DynamicMethod, MethodParams, dynamic_method_names, get_method, register

from pai_core.dynamic_methods import deepr, dsr, granet, mest, set_rigl, snfs, sr_ste, topkast  # noqa: E402,F401  (registration)

__all__ = ["DynamicMethod", "MethodParams", "dynamic_method_names", "get_method", "register"]
