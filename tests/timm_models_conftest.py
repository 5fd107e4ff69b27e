"""conftest.py for running timm's own model tests on civt-cache's models: ``make timm-tests
TIMM_SRC=/path/to/timm`` copies timm's ``tests/test_models.py`` and this file (as conftest.py)
into build/timm-tests and runs them on rednet* and civt* (timm's tests are not copied into the
project).

timm picks the config test a model gets by name pattern (NON_STD_FILTERS: 'vit_*', 'deit*', ...):
ViTs, whose forward_features are tokens, get test_model_default_cfgs_non_std. CivT is such a
ViT, so it is classified with them here, as adding 'civt_*' to that list upstream would.
"""
import timm

import civt_cache  # noqa: F401  (registers rednet*, civt_*)

_list_models = timm.list_models


def _is_non_std(patterns) -> bool:
    return isinstance(patterns, (list, tuple)) and "deit*" in patterns


def list_models(filter="", *args, exclude_filters="", **kwargs):
    names = _list_models(filter, *args, exclude_filters=exclude_filters, **kwargs)
    civt = [n for n in _list_models("civt_*", *args, **kwargs)]
    if _is_non_std(filter):
        names = sorted(set(names) | set(civt))
    if _is_non_std(exclude_filters):
        names = [n for n in names if n not in civt]
    return names


timm.list_models = list_models
