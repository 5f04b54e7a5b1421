"""Errors that leave the model whole: a snapshot of a model, put back exactly if an exception escapes.

refimpl's methods change the caller's model in place: layer by layer (GPTQ, AWQ, Wanda, SparseGPT —
a later layer can fail after the earlier ones were rewritten, when its activations overflow), by
swapping modules (packed and quantized layers, LoRA adapters, pruned projections) or by training it
(a loss that turns NaN at step 40). Arguments are checked before anything changes; what only shows
half-way — or an interrupt — is covered here. Every public function that changes a model runs inside
:func:`restored_on_error` (through the :func:`restores_on_error` decorator): on an exception the model
is put back bit for bit, with the same module objects in the same places, so the references the
caller holds (``model.model.layers[3].mlp``) stay valid, and the exception goes on.

The snapshot holds, for every module of the model, its class (a parametrization changes it) and its
attributes one level deep (the containers of child modules, parameters, buffers and hooks are copied,
so a swapped module, a new attribute or a changed flag is undone); for every parameter and buffer a
copy of its values, its ``requires_grad`` flag and a copy of its gradient; and the model's Hugging
Face ``config`` (structured pruning and GQA conversion change it). The copy of the values is the
cost: memory for one more copy of the model's tensors, on their devices, while the call runs. A call
on a model (or on a part of one) that an outer call already protects takes no second snapshot, nor does
a call on a fresh copy that no caller holds (:func:`private_copy`).

What it does not cover, because no refimpl function does it: hooks registered on tensors (not on
modules), a parametrization that the call removes, tensors created under ``torch.inference_mode``
(they cannot be written back outside it), attributes of the model other than modules, tensors and its
``config`` (``generation_config``), and an error that an inner protected call raises and its caller
catches inside an outer protected block (the inner call's changes are then kept).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

Function = TypeVar("Function", bound=Callable[..., Any])

#: ids of the modules inside an active snapshot (refimpl runs in one thread).
_protected: set[int] = set()


class _Snapshot:
    """What :func:`restored_on_error` puts back (module docstring)."""

    def __init__(self, models: list[nn.Module]):
        self.modules = list({id(m): m for model in models for m in model.modules()}.values())
        # Attributes by reference, and the contents of the containers among them (dicts, sets, lists:
        # _modules, _parameters, _buffers, hooks), to be put back into the same container objects.
        self.attributes = [(m, type(m), dict(vars(m)),
                            {name: copy.copy(v) for name, v in vars(m).items() if isinstance(v, (dict, set, list))})
                           for m in self.modules]
        tensors = {id(t): t for model in models for t in [*model.parameters(), *model.buffers()]}
        self.tensors = [(t, t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.detach().clone())
                        for t in tensors.values()]
        configs = {id(c): c for m in self.modules if (c := vars(m).get("config")) is not None
                   and not isinstance(c, (nn.Module, torch.Tensor))}
        self.configs = [(c, copy.deepcopy(vars(c))) for c in configs.values()]

    @torch.no_grad()
    def restore(self) -> None:
        for module, cls, attributes, contents in self.attributes:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for name, items in contents.items():
                _refill(attributes[name], items)
        for config, attributes in self.configs:
            vars(config).clear()
            vars(config).update(attributes)
        for tensor, values, requires_grad, grad in self.tensors:
            if (tensor.shape, tensor.dtype, tensor.device) == (values.shape, values.dtype, values.device):
                tensor.copy_(values)  # in place: views and tied weights keep sharing the storage
            else:  # the function replaced the tensor's data (``p.data = ...``)
                tensor.data = values
            tensor.requires_grad_(requires_grad)
            tensor.grad = grad


def _refill(container: dict | set | list, items: dict | set | list) -> None:
    """Make ``container`` hold ``items`` again (the same object: hook handles point to it)."""
    container.clear()
    if isinstance(container, list):
        container.extend(items)
    else:
        container.update(items)


@contextlib.contextmanager
def _marked(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, calls on ``modules`` take no snapshot of their own."""
    ids = {id(m) for m in modules} - _protected
    _protected.update(ids)
    try:
        yield
    finally:
        _protected.difference_update(ids)


@contextlib.contextmanager
def restored_on_error(*models: Any) -> Iterator[None]:
    """Within the block, the ``nn.Module`` among ``models`` may change; if an exception (an interrupt
    included) leaves the block, each is put back exactly as it was, and the exception propagates.
    Arguments that are not modules are ignored (the function checks them), as are modules that an
    outer block already protects."""
    fresh = [m for m in models if isinstance(m, nn.Module) and id(m) not in _protected]
    if not fresh:
        yield
        return
    snapshot = _Snapshot(fresh)
    with _marked(snapshot.modules):
        try:
            yield
        except BaseException:
            snapshot.restore()
            raise


@contextlib.contextmanager
def private_copy(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is a fresh copy that no caller holds (a student cut from its teacher):
    the functions called on it take no snapshot, since an error discards the copy anyway."""
    with _marked(model.modules()):
        yield model


def restores_on_error(*params: str) -> Callable[[Function], Function]:
    """Decorate a function that changes the models passed as ``params`` (argument names) in place: it
    runs inside :func:`restored_on_error` of those arguments, so an error leaves them as they were."""
    def decorate(fn: Function) -> Function:
        signature = inspect.signature(fn)
        unknown = [p for p in params if p not in signature.parameters]
        if unknown:
            raise TypeError(f"{fn.__qualname__} has no parameter {unknown}")

        @functools.wraps(fn)
        def protected(*args: Any, **kwargs: Any) -> Any:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:  # a wrong call: the function reports it, with nothing changed yet
                return fn(*args, **kwargs)
            with restored_on_error(*(arguments.get(p) for p in params)):
                return fn(*args, **kwargs)

        return protected  # type: ignore[return-value]

    return decorate
