"""
Optimizers torch.optim does not have as one object: MuonAdamW (GPT.configure_optimizers builds it).
"""


class MuonAdamW:
    """Muon and AdamW over disjoint parameters (GPT.configure_optimizers), stepped as one optimizer: param_groups
    lists both optimizers' groups, state_dict holds both states ({"muon": ..., "adamw": ...})."""

    def __init__(self, muon, adamw):
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self):  # read anew: load_state_dict replaces an optimizer's group dicts
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
