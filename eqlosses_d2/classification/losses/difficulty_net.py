"""
Difficulty-Net (Sinha and Ohashi, "Difficulty-Net: Learning to Predict Difficulty for Long-Tailed
Recognition", WACV 2023) as its authors' released code computes it.

Read: hitachi-rd-cv/Difficulty_Net at commit c6d13156, ``ImageNet_Places-LT/train_stage1.py``
(``Difficulty_Net``, ``train``, ``validate``, ``compute_batch_weights``, ``BalancedSoftmax``), its
configs ``config/imagenet/imagenet_resnet{10,50}_stage1.yaml``, and ``CIFAR-LT/cifar_train_exaugment.py``.

The paper: an MLP f_φ maps the vector of class-wise validation accuracies a (C,) to class
difficulties, used as the weights of the training loss; φ is meta-learned (one virtual SGD step
of the model on the weighted loss, then the loss of the stepped model on a meta set, back to φ)
plus λ times a "driver loss" MSE(f_φ(a), 1 − a / Σ_k a_k).

What their code computes (both the ImageNet/Places and the CIFAR scripts): the batch weights
are built with ``torch.tensor(class_weights)``, which copies **and detaches** them, so neither
the virtual step (a ``load_state_dict`` copy stepped by its own SGD on ImageNet/Places; a
second-order ``autograd.grad(create_graph=True)`` step on CIFAR) nor the meta-set loss reaches φ:
the meta-set term of their ``meta_loss`` has no path to the MLP and contributes a zero gradient.
The only gradient φ receives is that of the driver loss. Every iteration therefore does

    φ ← Adam(φ, ∇_φ λ · mean_j (f_φ(a)_j − (1 − a_j / (Σ_k a_k + 1e-12)))²)   (lr 1e-3, wd 1e-4),
    w = C · f_φ(a) / Σ_j f_φ(a)_j,
    L = mean_i w_{y_i} · ℓ(z_i, y_i),

with ℓ softmax CE, or Balanced Softmax CE(z + log n_j) (``BALANCED_SOFTMAX``; their ImageNet-LT and
Places-LT configs: ``bal_softmax: True``), and f_φ = sigmoid ∘ Linear(H, C) ∘ ReLU ∘ Linear(H, H)
∘ ReLU ∘ Linear(C, H). This module implements exactly that and omits the virtual step and the
meta-set forward, which change no weight and no model parameter (they cost one extra forward
and backward of the network per iteration in their code). The accuracies a are measured on the
validation split before the first iteration and then every ``UPDATE_PERIOD`` iterations by
:class:`eqlosses_d2.classification.difficulty.ClassDifficultyHook` (their ``validate`` at the
start of every epoch; counts all-reduced over the processes).

State (buffers, saved in checkpoints, identical in every process): the accuracies (float64), the
MLP's weights and Adam's moments and step (float32, as theirs), the current class weights
(float64). The MLP is initialized as ``nn.Linear`` does, from a generator seeded with
``INIT_SEED`` (the same in every process; the model's own initialization is left untouched).
Its weights are buffers, not parameters: Detectron2's optimizer does not see them and DDP does
not reduce them; they are stepped by PyTorch's own Adam function (``torch.optim.adam.adam``, fused
where PyTorch has the kernel), tested against ``torch.optim.Adam``.

Cost: every training step runs the MLP forward and backward and an Adam step over its
2·C·H + H² + 2H + C weights (3.1 M at C = 1000, H = 1024): ``benchmarks/bench_cls_losses.py``
8.3 ms against 1.1 ms for plain CE at 512 x 1000 on one CPU thread (PyTorch's fused Adam; 23 ms
with the update written out), small next to a ResNet-50 step; their code spends the same plus a
second forward and backward of the network (the pseudo model).

Defaults (their ImageNet-LT configs): H = 1024, λ = 0.3, Adam lr 1e-3, weight decay 1e-4;
``BALANCED_SOFTMAX`` False here (their CIFAR ``Difficulty_net`` loss type; the ImageNet-LT config of
this package sets it). Config node ``MODEL.EQLOSSES.CLASSIFICATION.DIFFICULTY_NET``.

Where ours differs from their code:
- no virtual step and no meta-set pass (see above: without effect on the weights in their code);
- a class without images in the measurement split keeps its last accuracy (theirs: 0/0, NaN);
- their Balanced Softmax is ``−log(e^{z_y} n_y) + log(Σ_j e^{z_j} n_j + 1e-12)`` without the
  max subtraction; ours is ``CE(z + log n)`` (equal up to the 1e-12, and finite for large logits);
- their accuracies before the first validation are zeros on CIFAR; on ImageNet/Places they
  validate before epoch 0, as the hook does here;
- the measurement period is in iterations, not epochs.
"""
import math

import torch
from torch.nn import functional as F
from torch.optim.adam import adam as adam_update

from ...registry import IMAGE_CLS_LOSS_REGISTRY, config_node, register
from .base import ImageClassificationLoss

__all__ = ["DifficultyNetCE", "driver_target"]

#: the MLP's layers, in order
_LAYERS = ("fc1", "fc2", "fc3")
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def driver_target(accuracy: torch.Tensor) -> torch.Tensor:
    """Their driver loss's target ``1 − a / (Σ a + 1e-12)``."""
    return 1.0 - accuracy / (accuracy.sum() + 1e-12)


@register(IMAGE_CLS_LOSS_REGISTRY)
class DifficultyNetCE(ImageClassificationLoss):
    name = "difficulty_net"
    config_node = "DIFFICULTY_NET"
    #: the trainer adds :class:`~eqlosses_d2.classification.difficulty.ClassDifficultyHook`
    measures_class_difficulty = True
    #: ... which also measures before the first iteration (their ``validate`` before epoch 0)
    measure_before_training = True

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.DIFFICULTY_NET")
        # width of the MLP's two hidden layers (theirs: hidden_layer 1024)
        _C.HIDDEN = 1024
        # λ of the driver loss λ·MSE(f(a), 1 − a/Σa), the only gradient the MLP gets in their code (lamda 0.3)
        _C.DRIVER_LOSS_WEIGHT = 0.3
        # the MLP's Adam: learning rate and (L2) weight decay (diff_net_lr 1e-3, diff_net_wd 1e-4)
        _C.LR = 1e-3
        _C.WEIGHT_DECAY = 1e-4
        # per-sample loss: Balanced Softmax CE(z + log n_j) instead of CE (their ImageNet-LT config: bal_softmax True)
        _C.BALANCED_SOFTMAX = False
        # seed of the MLP's initialization (the same in every process)
        _C.INIT_SEED = 0
        # iterations between two measurements of the class accuracies (theirs: every epoch)
        _C.UPDATE_PERIOD = 1000
        # dataset the accuracies are measured on ("": the _val split of DATASETS.TRAIN[0])
        _C.DIFFICULTY_DATASET = ""

    def __init__(self, num_classes, class_stats=None, hidden=1024, driver_loss_weight=0.3, lr=1e-3,
                 weight_decay=1e-4, balanced_softmax=False, init_seed=0, update_period=1000, difficulty_dataset=""):
        super().__init__(num_classes, class_stats)
        if hidden < 1:
            raise ValueError(f"DIFFICULTY_NET.HIDDEN must be >= 1, got {hidden}")
        if not driver_loss_weight > 0:
            raise ValueError(f"DIFFICULTY_NET.DRIVER_LOSS_WEIGHT must be > 0, got {driver_loss_weight}")
        if not lr > 0:
            raise ValueError(f"DIFFICULTY_NET.LR must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"DIFFICULTY_NET.WEIGHT_DECAY must be >= 0, got {weight_decay}")
        if update_period < 1:
            raise ValueError(f"DIFFICULTY_NET.UPDATE_PERIOD must be >= 1, got {update_period}")
        self.hidden = int(hidden)
        self.driver_loss_weight = float(driver_loss_weight)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.balanced_softmax = bool(balanced_softmax)
        # read by the hook
        self.update_period = int(update_period)
        self.difficulty_dataset = str(difficulty_dataset)
        self.register_buffer("accuracy", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("class_weights", torch.ones(num_classes, dtype=torch.float64))
        generator = torch.Generator().manual_seed(int(init_seed))
        sizes = {"fc1": (self.hidden, num_classes), "fc2": (self.hidden, self.hidden), "fc3": (num_classes, self.hidden)}
        for layer in _LAYERS:
            out_features, in_features = sizes[layer]
            bound = 1.0 / math.sqrt(in_features)  # nn.Linear's kaiming_uniform(a=√5) and bias bound
            weight = torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
            bias = torch.empty(out_features).uniform_(-bound, bound, generator=generator)
            for kind, tensor in (("weight", weight), ("bias", bias)):
                self.register_buffer(f"{layer}_{kind}", tensor)
                self.register_buffer(f"{layer}_{kind}_exp_avg", torch.zeros_like(tensor))
                self.register_buffer(f"{layer}_{kind}_exp_avg_sq", torch.zeros_like(tensor))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))

    # -- the MLP --------------------------------------------------------------------------------

    def _mlp_names(self):
        return [f"{layer}_{kind}" for layer in _LAYERS for kind in ("weight", "bias")]

    def mlp(self, accuracy: torch.Tensor, weights=None) -> torch.Tensor:
        """f(a): (C,) float32 sigmoid outputs of the MLP (its buffers, or ``weights`` in their order)."""
        w = weights if weights is not None else [getattr(self, name) for name in self._mlp_names()]
        x = accuracy.float()[None, :]
        x = F.relu(F.linear(x, w[0], w[1]))
        x = F.relu(F.linear(x, w[2], w[3]))
        return torch.sigmoid(F.linear(x, w[4], w[5]))[0]

    @torch.no_grad()
    def _adam_step(self, grads):
        """One step of PyTorch's Adam (``torch.optim.adam.adam``, the function ``torch.optim.Adam``
        runs: β 0.9, 0.999, ε 1e-8, L2 weight decay, no amsgrad) on the MLP's buffers, fused into
        one kernel per tensor where PyTorch has it (float32 on the CPU or CUDA: ~6x faster than
        the same update written out, a dozen passes over 3 M weights)."""
        names = self._mlp_names()
        params = [getattr(self, name) for name in names]
        # the step count before this step, one tensor per weight (the update increments them)
        steps = [self.adam_step.to(torch.float32) for _ in names]
        fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
        adam_update(params, list(grads), [getattr(self, f"{name}_exp_avg") for name in names],
                    [getattr(self, f"{name}_exp_avg_sq") for name in names], [], steps,
                    fused=fused or None, foreach=False if not fused else None, amsgrad=False,
                    beta1=_ADAM_BETAS[0], beta2=_ADAM_BETAS[1], lr=self.lr, weight_decay=self.weight_decay,
                    eps=_ADAM_EPS, maximize=False)
        self.adam_step += 1

    def update_mlp(self):
        """One Adam step of the MLP on λ · MSE(f(a), 1 − a/Σa), then the class weights C·f(a)/Σf(a)."""
        accuracy = self.accuracy.float()
        with torch.enable_grad():
            weights = [getattr(self, name).detach().requires_grad_() for name in self._mlp_names()]
            driver = F.mse_loss(self.mlp(accuracy, weights), driver_target(accuracy))
            grads = torch.autograd.grad(self.driver_loss_weight * driver, weights)
        self._adam_step(grads)
        with torch.no_grad():
            predicted = self.mlp(accuracy)
            self.class_weights.copy_(predicted.double() * (self.num_classes / predicted.double().sum()))

    # -- the hook's interface -------------------------------------------------------------------

    @torch.no_grad()
    def update_class_accuracy(self, correct: torch.Tensor, count: torch.Tensor):
        """Set ``a = correct / count`` per class (counts over all processes; a class with
        ``count == 0`` keeps its accuracy)."""
        correct = correct.to(self.accuracy.device, torch.float64)
        count = count.to(self.accuracy.device, torch.float64)
        self.accuracy.copy_(torch.where(count > 0, correct / count.clamp(min=1), self.accuracy))

    def difficulty_scalars(self) -> dict:
        """What the hook logs after a measurement."""
        weights = self.class_weights
        return {"difficulty_net/mean_accuracy": float(self.accuracy.mean()),
                "difficulty_net/weight_min": float(weights.min()), "difficulty_net/weight_max": float(weights.max())}

    # -- the loss -------------------------------------------------------------------------------

    def forward(self, logits, labels):
        self._check(logits, labels)
        labels = labels.long()
        if self.training:
            self.update_mlp()
        logits = logits.float()
        if self.balanced_softmax:
            counts = self.require_image_counts().to(logits.device, torch.float64)
            logits = logits + counts.clamp(min=1e-12).log().float()
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        weights = self.class_weights.to(device=logits.device, dtype=torch.float32)[labels]
        return {"loss_cls": (weights * per_sample).mean() if len(labels) else per_sample.sum()}

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, hidden={self.hidden}, driver_loss_weight={self.driver_loss_weight}, lr={self.lr}, "
                f"weight_decay={self.weight_decay}, balanced_softmax={self.balanced_softmax}, "
                f"update_period={self.update_period}, difficulty_dataset='{self.difficulty_dataset}'")
