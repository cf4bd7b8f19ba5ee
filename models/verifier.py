"""The verification model: an encoder, a classification head and the learned distance."""

import torch
import torch.nn.functional as F
from torch import nn

from losses import batch_pairs, build_head


def _mlp_tail(in_features, hidden_size, n_hidden, dropout_prob):
    """Layers after a head's pair representation: (n_hidden - 1) x [Linear -> LeakyReLU(0.1)], Dropout, Linear(-> 1)."""
    layers = []
    for _ in range(n_hidden - 1):
        layers += [nn.Linear(in_features, hidden_size), nn.LeakyReLU(0.1, inplace=True)]
        in_features = hidden_size
    layers += [nn.Dropout(dropout_prob), nn.Linear(in_features, 1)]
    return nn.Sequential(*layers)


class DistanceHead(nn.Module):
    """One discriminator MLP on the concatenated pair [a; b] (the research code's learned distance).

    Layout (seed): optional random projection of [a; b] to `rproj_size`, Linear -> LeakyReLU(0.1),
    (n_hidden - 1) x [Linear -> LeakyReLU(0.1)], Dropout, Linear(-> 1). The projection is a fixed
    buffer unless `trainable_rproj` (what the seed code really did, through a `require_grad` typo).
    With `normalize`, a and b are L2-normalised first.

    Fast form: the first layer splits into a left and a right half, each applied once per embedding
    (`project`), so a pair costs one addition (`combine`) plus the small rest of the MLP (`tail`).
    """

    pair_features = "concat"

    def __init__(
        self, emb_size, hidden_size, n_hidden, dropout_prob, rproj_size=0, trainable_rproj=False, normalize=False
    ):
        super().__init__()
        self.emb_size = emb_size
        self.normalize = normalize
        in_features = 2 * emb_size
        if rproj_size > 0:
            proj = torch.randn(rproj_size, in_features)
            proj = proj / proj.norm()
            if trainable_rproj:
                self.proj = nn.Parameter(proj)
            else:
                self.register_buffer("proj", proj)
            in_features = rproj_size
        else:
            self.proj = None
        self.first = nn.Linear(in_features, hidden_size)
        self.rest = _mlp_tail(hidden_size, hidden_size, n_hidden, dropout_prob)

    @property
    def pair_width(self):
        """Activations held per pair by `combine` (what bounds the scoring block size)."""
        return self.first.out_features

    def _input(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, a, b):
        """(pairs, emb), (pairs, emb) -> logits (pairs,): the naive per-pair form."""
        pair = torch.cat([self._input(a), self._input(b)], dim=1)
        if self.proj is not None:
            pair = pair @ self.proj.t()
        return self.tail(self.first(pair))

    def split_first_layer(self, emb):
        """(n, emb) -> (n, hidden) for the left slot (bias included) and for the right slot, so that
        `first([a; b]) == left[a] + right[b]`."""
        weight = self.first.weight
        if self.proj is not None:
            weight = weight @ self.proj
        emb = self._input(emb)
        left = F.linear(emb, weight[:, : self.emb_size], self.first.bias)
        right = F.linear(emb, weight[:, self.emb_size :])
        return left, right

    def project(self, emb):
        """Per-embedding work, done once for N embeddings: (n, emb) -> an opaque tuple for `combine`."""
        return self.split_first_layer(emb)

    def combine(self, projected, index_a, index_b):
        """First-layer outputs of the pairs (projected[index_a], projected[index_b]).

        Indices are tensors (aligned trials) or broadcasting slices (a block of all pairs); the result,
        (..., pair_width), is a fresh tensor that `tail` may overwrite.
        """
        left, right = projected
        return left[index_a] + right[index_b]

    def tail(self, hidden):
        """Everything after the first layer: (..., pair_width) -> logits (...). `hidden` is overwritten
        (activations run in place: all-pairs scoring holds large blocks)."""
        return self.rest(F.leaky_relu(hidden, 0.1, inplace=True)).squeeze(-1)

    def regulariser(self):
        """The head's own penalty term for the training loss (0-dim); none for this head."""
        return self.first.weight.new_zeros(())


class SymmetricDistanceHead(DistanceHead):
    """An order-invariant discriminator on relations between the two embeddings.

    P = U normalize(e) (Linear emb -> ceil(hidden/2), once per embedding); a pair is represented by
    [P_a * P_b, |P_a - P_b|] (about `hidden` values, as wide as the concatenated head's first layer),
    then LeakyReLU and the same MLP tail. score(a, b) == score(b, a) exactly (both features are
    symmetric in floating point), the head sees only where the two embeddings agree or differ, not
    where they sit, and a pair costs O(hidden) elementwise work plus the tail.
    """

    pair_features = "sym"

    def __init__(self, emb_size, hidden_size, n_hidden, dropout_prob, rproj_size=0, trainable_rproj=False, **_):
        nn.Module.__init__(self)
        if rproj_size > 0:
            raise ValueError("--rproj-size applies to the concatenated pair only (--pair-features concat)")
        self.emb_size = emb_size
        self.normalize = True
        self.proj = None
        half = (hidden_size + 1) // 2
        self.first = nn.Linear(emb_size, half)
        self.rest = _mlp_tail(2 * half, hidden_size, n_hidden, dropout_prob)

    @property
    def pair_width(self):
        return 2 * self.first.out_features

    @staticmethod
    def _relation(pa, pb):
        """[pa * pb, |pa - pb|] along the last axis (broadcasting); when scoring (no autograd) written into one
        fresh tensor without the copy of a concatenation."""
        if torch.is_grad_enabled() and (pa.requires_grad or pb.requires_grad):
            return torch.cat([pa * pb, (pa - pb).abs()], dim=-1)
        shape = torch.broadcast_shapes(pa.shape, pb.shape)
        half = shape[-1]
        out = torch.empty(*shape[:-1], 2 * half, dtype=torch.result_type(pa, pb), device=pa.device)
        torch.mul(pa, pb, out=out[..., :half])
        torch.sub(pa, pb, out=out[..., half:]).abs_()
        return out

    def forward(self, a, b):
        return self.tail(self._relation(self.first(self._input(a)), self.first(self._input(b))))

    def project(self, emb):
        return self.first(self._input(emb))

    def combine(self, projected, index_a, index_b):
        return self._relation(projected[index_a], projected[index_b])


COS_SCALE, COS_OFFSET = 10.0, -5.0  # initial a, b of CosineDistanceHead: logit 0 at cos 0.5, range [-15, 5]


class CosineDistanceHead(SymmetricDistanceHead):
    """A learned distance anchored on cosine: logit = a * cos(e1, e2) + b + g(e1, e2).

    a, b: learned scalars, initially COS_SCALE and COS_OFFSET (logit 0 at cos 0.5, -5 at cos 0). g: the
    symmetric head's MLP over [P_a * P_b, |P_a - P_b|] with its last layer zero-initialised, so an untrained
    head is an increasing affine map of cosine (cosine's EER exactly) and training learns a correction to it.
    score(a, b) == score(b, a) exactly. The cosine is computed in float32 (outside autocast). `regulariser()`
    is the mean g^2 over the pairs of the last forward with autograd: the penalty that keeps g small.
    """

    pair_features = "cos"

    def __init__(self, emb_size, hidden_size, n_hidden, dropout_prob, rproj_size=0, trainable_rproj=False, **_):
        super().__init__(emb_size, hidden_size, n_hidden, dropout_prob, rproj_size, trainable_rproj)
        self.scale = nn.Parameter(torch.tensor(COS_SCALE))
        self.offset = nn.Parameter(torch.tensor(COS_OFFSET))
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)
        self._penalty = None

    @property
    def pair_width(self):
        return 2 * self.first.out_features + 1  # the relation and the cosine

    @staticmethod
    def _cosine(ua, ub):
        """Dot products of unit vectors along the last axis (broadcasting), in float32 at least; a block of all
        pairs, (rows, 1, emb) x (1, cols, emb), as one matrix product (no (rows, cols, emb) temporary)."""
        dtype = torch.promote_types(torch.result_type(ua, ub), torch.float32)
        ua, ub = ua.to(dtype), ub.to(dtype)
        with torch.autocast(ua.device.type, enabled=False):
            if ua.dim() == 3 and ub.dim() == 3 and ua.shape[1] == 1 and ub.shape[0] == 1:
                return ua[:, 0] @ ub[0].t()
            return (ua * ub).sum(-1)

    def forward(self, a, b):
        ua, ub = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return self.tail((self._relation(self.first(ua), self.first(ub)), self._cosine(ua, ub)))

    def project(self, emb):
        unit = F.normalize(emb, dim=-1)
        return unit, self.first(unit)

    def combine(self, projected, index_a, index_b):
        """(relation (..., pair_width - 1), cosine (...)) of the pairs (see DistanceHead.combine)."""
        unit, proj = projected
        return self._relation(proj[index_a], proj[index_b]), self._cosine(unit[index_a], unit[index_b])

    def tail(self, hidden):
        """(relation, cosine) -> logits a * cos + b + g (...); the relation is overwritten when scoring."""
        relation, cos = hidden
        correction = self.rest(F.leaky_relu(relation, 0.1, inplace=True)).squeeze(-1)
        tracked = torch.is_grad_enabled() and correction.requires_grad
        self._penalty = correction.float().square().mean() if tracked else None
        return self.scale * cos + self.offset + correction

    def regulariser(self):
        """Mean g^2 over the pairs of the last forward with autograd (0-dim; zero when there was none)."""
        return self._penalty if self._penalty is not None else self.scale.new_zeros(())


# --pair-features: how a head represents a pair; each class owns its naive and its projected form.
PAIR_FEATURES = {"concat": DistanceHead, "sym": SymmetricDistanceHead, "cos": CosineDistanceHead}


class LearnedDistance(nn.Module):
    """An ensemble of `ndiscriminators` heads; its score is the mean sigmoid output, its logit the mean logit."""

    def __init__(
        self,
        emb_size,
        hidden_size=512,
        n_hidden=1,
        dropout_prob=0.25,
        ndiscriminators=1,
        rproj_size=0,
        trainable_rproj=False,
        pair_features="concat",
        normalize=False,
    ):
        super().__init__()
        head = PAIR_FEATURES[pair_features]
        self.pair_features = pair_features
        self.heads = nn.ModuleList(
            head(emb_size, hidden_size, n_hidden, dropout_prob, rproj_size, trainable_rproj, normalize=normalize)
            for _ in range(ndiscriminators)
        )

    def forward(self, a, b):
        """(pairs, emb) x 2 -> logits (n_heads, pairs), each pair through the naive form."""
        return torch.stack([head(a, b) for head in self.heads])

    @property
    def pair_width(self):
        """Activations per pair over all heads in the projected form."""
        return sum(head.pair_width for head in self.heads)

    def project(self, emb):
        """(n, emb) -> the heads' per-embedding projections, for `projected_logits`."""
        return [head.project(emb) for head in self.heads]

    def projected_logits(self, projected, index_a, index_b):
        """Logits (n_heads, ...) of the pairs (index_a, index_b) of projected embeddings (see DistanceHead.combine)."""
        return torch.stack([head.tail(head.combine(p, index_a, index_b)) for head, p in zip(self.heads, projected)])

    def pair_logits(self, emb, idx_a, idx_b):
        """Logits (n_heads, pairs) of the pairs (emb[idx_a], emb[idx_b]), through the projected form."""
        return self.projected_logits(self.project(emb), idx_a, idx_b)

    def regulariser(self):
        """Sum over the heads of their penalty terms for the last training forward (0-dim; 0 for concat and sym):
        the cos heads' mean squared correction, which the training loop adds to the pair loss times a weight."""
        return torch.stack([head.regulariser() for head in self.heads]).sum()

    def score(self, a, b):
        """(pairs, emb) x 2 -> probability of same class (pairs,), averaged over heads."""
        return torch.sigmoid(self.forward(a, b)).mean(0)


class VerifierModel(nn.Module):
    """Encoder + classification head + learned distance, rebuilt from `config` alone.

    `config` keys: model, encoder_args (dict), n_classes, softmax, margin, scale, hidden_size,
    n_hidden, dropout_prob, ndiscriminators, rproj_size, trainable_rproj, and (absent in older
    checkpoints) pair_features, distance_norm, detach_distance, softmax_scale.
    """

    def __init__(self, config):
        super().__init__()
        from models import create_encoder

        self.config = dict(config)
        self.encoder = create_encoder(config["model"], **config.get("encoder_args", {}))
        cls_size = self.encoder.latent_size
        self.classifier = build_head(
            config["softmax"],
            cls_size,
            config["n_classes"],
            config.get("margin", 0.35),
            config.get("scale", 30.0),
            config.get("softmax_scale", 1.0),  # checkpoints from before --softmax-scale: the seed's unscaled head
        )
        self.distance = LearnedDistance(
            self.encoder.embedding_size,
            config["hidden_size"],
            config["n_hidden"],
            config["dropout_prob"],
            config["ndiscriminators"],
            config["rproj_size"],
            config.get("trainable_rproj", False),
            config.get("pair_features", "concat"),  # checkpoints from before the variants are concat
            config.get("distance_norm", False),
        )
        self.detach_distance = config.get("detach_distance", False)

    def forward(self, x, labels=None):
        """Input batch -> (embedding (batch, emb), classification input (batch, latent)).

        With `labels` (training) it returns what the losses need instead: classification logits
        (batch, n_classes), pair logits (n_heads, pairs) for all i < j pairs, and their same-class flags.
        """
        emb, latent = self.encoder(x)
        if labels is None:
            return emb, latent
        logits = self.classifier(latent, labels)
        idx_a, idx_b, same = batch_pairs(labels)
        pair_input = emb.detach() if self.detach_distance else emb
        return logits, self.distance.pair_logits(pair_input, idx_a, idx_b), same

    def embed(self, x):
        """Input batch -> verification embedding (batch, emb)."""
        return self.encoder(x)[0]


def build_model(config):
    """The VerifierModel described by a checkpoint's `model_config`."""
    return VerifierModel(config)
