"""The optimizers, over dicts of tensors, in place: AdamW (float32 or 8-bit states), Muon (with AdamW beside it),
Adafactor and SOAP; and pure learning-rate schedules. `optimizer(name)` gives the pair a step needs: a state's init
and its in-place update."""

import functools
from typing import Any, Callable, Optional

import attrs

from automodel.optim.adafactor import AdafactorHyper, AdafactorState, adafactor_init, adafactor_update_
from automodel.optim.adamw import (AdamWHyper, AdamWState, Tensors, adamw_init, adamw_update_, clip_by_global_norm_,
                                   global_norm, no_decay_names)
from automodel.optim.adamw8bit import AdamW8bitState, adamw8bit_init, adamw8bit_update_, state_bytes
from automodel.optim.muon import MuonHyper, MuonState, hidden_matrices, muon_init, muon_update_
from automodel.optim.schedules import lr_at
from automodel.optim.soap import SoapHyper, SoapState, soap_init, soap_update_

NAMES = ("adamw", "adamw8bit", "muon", "adafactor", "soap")


@attrs.frozen
class Optimizer:
    name: str
    init: Callable[[Tensors], Any]  # params -> the zero state
    update_: Callable[[Tensors, Tensors, Any, float, AdamWHyper], tuple[Tensors, Any]]  # in place, as adamw_update_


def optimizer(name: str = "adamw", paged: bool = False, muon: Optional[MuonHyper] = None,
              soap: SoapHyper = SoapHyper(), adafactor: AdafactorHyper = AdafactorHyper()) -> Optimizer:
    """optim.name -> its functional form: "adamw" (optim/adamw.py), "adamw8bit" (optim/adamw8bit.py), "muon"
    (optim/muon.py; `muon` names its matrices), "adafactor" (optim/adafactor.py) or "soap" (optim/soap.py)."""
    if name == "adamw8bit":
        return Optimizer(name, functools.partial(adamw8bit_init, paged=paged), adamw8bit_update_)
    if name == "muon":
        if muon is None:
            raise ValueError("Muon needs its MuonHyper: which tensors are the hidden matrices (hidden_matrices())")
        return Optimizer(name, functools.partial(muon_init, hp=muon), functools.partial(muon_update_, muon=muon))
    if name == "adafactor":
        return Optimizer(name, adafactor_init, functools.partial(adafactor_update_, factor=adafactor))
    if name == "soap":
        return Optimizer(name, functools.partial(soap_init, hp=soap), functools.partial(soap_update_, soap=soap))
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(NAMES)}")
    return Optimizer(name, adamw_init, adamw_update_)


__all__ = ["AdafactorHyper", "AdafactorState", "AdamW8bitState", "AdamWHyper", "AdamWState", "MuonHyper", "MuonState",
           "NAMES", "Optimizer", "SoapHyper", "SoapState", "adafactor_init", "adafactor_update_", "adamw8bit_init",
           "adamw8bit_update_", "adamw_init", "adamw_update_", "clip_by_global_norm_", "global_norm", "hidden_matrices",
           "lr_at", "muon_init", "muon_update_", "no_decay_names", "optimizer", "soap_init", "soap_update_",
           "state_bytes"]
