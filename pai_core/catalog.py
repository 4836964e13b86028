"""Everything a user can name in a spec, with one line each: what `pai list` prints. Read
from the registries, so a new criterion, model, dataset or paradigm appears by itself."""
from __future__ import annotations

from pai_core.criteria import criterion_names, get_criterion
from pai_core.data import dataset_info, dataset_names
from pai_core.models import model_info, model_names
from pai_core.paradigms import dynamic_sparse, get_paradigm, paradigm_names, prune_after_training, supermask
from pai_core.specs import SCHEDULES, SCOPES


def catalog() -> list[tuple[str, str, str]]:
    """(kind, name, description) rows, grouped by kind."""
    rows = [("paradigm (flow)", n, get_paradigm(n).description) for n in paradigm_names()]
    rows += [("criterion (prune.criterion)", n, get_criterion(n).description) for n in criterion_names()]
    rows += [("dynamic method (dynamic.method)", n, d) for n, d in dynamic_sparse.METHODS.items()]
    rows += [("selection method (selection.method)", n, d) for n, d in supermask.METHODS.items()]
    rows += [("schedule (prune.schedule)", n, d) for n, d in SCHEDULES.items()]
    rows += [("scope (prune.scope)", n, d) for n, d in SCOPES.items()]
    rows += [("structure (prune.structure)", n, d) for n, d in prune_after_training.STRUCTURES.items()]
    for n in model_names():
        info = model_info(n)
        params = ", ".join(info.Params.model_fields)
        rows.append(("model (model.name)", n, info.description + (f" [params: {params}]" if params else "")))
    for n in dataset_names():
        d = dataset_info(n)
        rows.append(("dataset (data.dataset)", n, f"{'x'.join(map(str, d.in_shape))} inputs, {d.num_classes} classes, "
                                                  f"{d.train_size} train examples"))
    return rows
