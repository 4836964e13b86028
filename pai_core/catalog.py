"""Everything a user can name in a spec, with one line each: what `pai list` prints. Read
from the registries, so a new criterion, model, dataset or paradigm appears by itself."""
from __future__ import annotations

from pai_core.criteria import criterion_names, get_criterion
from pai_core.data import dataset_info, dataset_names
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.models import model_info, model_names
from pai_core.paradigms import filters, get_paradigm, paradigm_names, prune_at_init, supermask
from pai_core.specs import SCHEDULES, SCOPES


def catalog() -> list[tuple[str, str, str]]:
    """(kind, name, description) rows, grouped by kind."""
    rows = [("paradigm (flow)", n, get_paradigm(n).description) for n in paradigm_names()]
    rows += [("criterion (prune.criterion)", n, get_criterion(n).description) for n in criterion_names()]
    for n in dynamic_method_names():
        m = get_method(n)
        params = ", ".join(m.Params.model_fields)
        rows.append(("dynamic method (dynamic.method)", n, m.description + (f" [params: {params}]" if params else "")))
    rows += [("selection method (selection.method)", n, d) for n, d in supermask.METHODS.items()]
    rows += [("schedule (prune.schedule)", n, d) for n, d in SCHEDULES.items()]
    rows += [("scope (prune.scope)", n, d) for n, d in SCOPES.items()]
    rows += [("re-init at init (prune.init_after_mask)", n, d) for n, d in prune_at_init.INIT_AFTER_MASK.items()]
    rows += [("structure (prune.structure)", n, d) for n, d in filters.STRUCTURES.items()]
    for n in model_names():
        info = model_info(n)
        params = ", ".join(info.Params.model_fields)
        rows.append(("model (model.name)", n, info.description + (f" [params: {params}]" if params else "")))
    for n in dataset_names():
        d = dataset_info(n)
        rows.append(("dataset (data.dataset)", n, d.description or f"{'x'.join(map(str, d.in_shape))} inputs, "
                                                                  f"{d.num_classes} classes, {d.train_size} train examples"))
    return rows
