"""Fine-tuning: start a training run from a checkpoint's encoder and learned distance (train.py --pretrained-path).

The architecture comes from the checkpoint: the model is its `model_config` with the new data's number
of classes (a fresh classification head), and the run's head and regularisation settings (--softmax,
--margin, --scale, --dropout-prob, --detach-distance). Flags that shape the encoder or the distance and
were typed with another value than the checkpoint's are refused, as is data the encoder cannot take.
"""

import models
from checkpoints import check_known_model, load_checkpoint, strip_wrapper_prefixes
from utils import UserError

# flag -> where train.model_config keeps its value (a key, or (encoder_args, key)).
ARCHITECTURE_FLAGS = {
    "--model": "model",
    "--hidden-size": "hidden_size",
    "--n-hidden": "n_hidden",
    "--ndiscriminators": "ndiscriminators",
    "--rproj-size": "rproj_size",
    "--trainable-rproj": "trainable_rproj",
    "--pair-features": "pair_features",
    "--distance-norm": "distance_norm",
    "--latent-size": ("encoder_args", "latent_size"),
    "--ncoef": ("encoder_args", "ncoef"),
    "--channels": ("encoder_args", "channels"),
    "--width": ("encoder_args", "width"),
    "--final-norm": ("encoder_args", "final_norm"),
}
DEFAULTS = {"pair_features": "concat", "distance_norm": False, "trainable_rproj": False}  # older checkpoints
DATA_SHAPED = ("in_channels", "stem", "ncoef")  # encoder arguments the training data decides
RUN_SETTINGS = ("n_classes", "softmax", "margin", "scale", "softmax_scale", "dropout_prob", "detach_distance")
COPIED = ("encoder.", "distance.")


def _value(config, where):
    if isinstance(where, tuple):
        return config.get(where[0], {}).get(where[1])
    return config.get(where, DEFAULTS.get(where))


def pretrained_config(cp_path, state, config, typed):
    """The model_config of a fine-tuning run: the checkpoint's architecture, this run's classes and head.

    `config`: what the run's flags and data give (train.model_config plus frontend / image_input);
    `typed`: the flags typed on the command line. UserError on a contradiction.
    """
    from frontend import FrontEnd

    old = state["model_config"]
    for flag, where in ARCHITECTURE_FLAGS.items():
        if flag in typed and _value(config, where) != _value(old, where):
            raise UserError(
                f"{flag} {_value(config, where)} contradicts --pretrained-path {cp_path}, whose model has "
                f"{_value(old, where)}; drop the flag (the architecture comes from the checkpoint)"
            )
    for key in DATA_SHAPED:
        new, had = config["encoder_args"].get(key), old.get("encoder_args", {}).get(key)
        if new is not None and had is not None and new != had:
            raise UserError(
                f"the training data gives {key} {new} but the model of {cp_path} takes {had}; fine-tune on data "
                "of the same kind"
            )
    if config.get("frontend") and old.get("frontend"):
        difference = FrontEnd.from_dict(old["frontend"]).describe_difference(FrontEnd.from_dict(config["frontend"]))
        if difference:
            raise UserError(f"the training data does not fit the model of {cp_path}: {difference} (model vs data)")
    out = {**old, **{key: config[key] for key in RUN_SETTINGS if key in config}}
    for key in ("frontend", "image_input"):
        out[key] = config.get(key) or old.get(key)
    return out


def start_from(cp_path, config, typed, verbose=True):
    """A new Verifier for `config`'s classes with the encoder and learned distance of checkpoint `cp_path`."""
    state = load_checkpoint(cp_path)
    check_known_model(state["model_config"], cp_path)
    model = models.build_model(pretrained_config(cp_path, state, config, typed))
    weights = {k: v for k, v in strip_wrapper_prefixes(state["model_state"]).items() if k.startswith(COPIED)}
    wanted = [k for k in model.state_dict() if k.startswith(COPIED)]
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise UserError(f"{cp_path} lacks weights the model needs, e.g. {missing[0]}")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise UserError(f"{cp_path} does not fit its own model_config: {str(err).splitlines()[0]}") from None
    if verbose:
        print(
            f"starting from {cp_path}: encoder and learned distance ({len(wanted)} tensors), a new "
            f"{model.config['softmax']} head for {model.config['n_classes']} classes",
            flush=True,
        )
    return model
