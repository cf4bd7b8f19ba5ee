"""Fine-tuning: start a training run from a checkpoint's encoder and learned distance (train.py --pretrained-path).

The architecture comes from the checkpoint: `adopt_architecture` reads it before any data, refuses a checkpoint
of the other domain and typed flags that contradict it, and fills in the others; the model is then the
checkpoint's `model_config` with the new data's number of classes (a fresh classification head), and the run's
head and regularisation settings (--softmax, --margin, --scale, --dropout-prob, --detach-distance). Data the
encoder cannot take is refused.
"""

import inspect

import models
from e2e_verification.checkpoints import check_known_model, load_checkpoint, strip_wrapper_prefixes
from e2e_verification.tasks import task_for_model
from utils import UserError, flag_value

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
    """A model_config's value at `where` (see ARCHITECTURE_FLAGS); what it leaves out is the default: the
    encoder's own for its arguments (None for one it does not take), DEFAULTS for older checkpoints."""
    if isinstance(where, tuple):
        encoder_args = config.get(where[0], {})
        return encoder_args[where[1]] if where[1] in encoder_args else _encoder_default(config["model"], where[1])
    return config.get(where, DEFAULTS.get(where))


def _encoder_default(name, key):
    """The default of argument `key` of registered encoder `name`; None when it takes no such argument."""
    models.encoder_names()  # loads the registry
    found = inspect.signature(models.ENCODERS[name][0]).parameters.get(key) if name in models.ENCODERS else None
    return None if found is None or found.default is inspect.Parameter.empty else found.default


def _article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _check_typed(cp_path, old, flag, value):
    """Refuse an architecture flag typed with another value than the one checkpoint `cp_path`'s config `old` has."""
    had = _value(old, ARCHITECTURE_FLAGS[flag])
    if value == had:
        return
    drop = "drop the flag (the architecture comes from the checkpoint)"
    if had is None:
        raise UserError(
            f"{flag} {value} does not apply to --pretrained-path {cp_path}: its {old['model']} model takes no "
            f"{flag}; {drop}"
        )
    raise UserError(f"{flag} {value} contradicts --pretrained-path {cp_path}, whose model has {had}; {drop}")


def read(cp_path):
    """The checkpoint to fine-tune from (a weights-only load), its encoder a registered one."""
    state = load_checkpoint(cp_path)
    check_known_model(state["model_config"], cp_path)
    return state


def check_domain(cp_path, old, task, data):
    """Refuse a checkpoint whose encoder is of another domain than the run's `task`; `data` says what the data is."""
    model_task = task_for_model(old["model"])
    if model_task is not task:
        raise UserError(
            f"--pretrained-path {cp_path} holds {_article(model_task.name)} model ({old['model']}), not "
            f"{_article(task.name)} model: the training data ({data}) is {task.name} data; fine-tune it on "
            f"{model_task.name} data ({model_task.data_flag})"
        )


def adopt_architecture(args, task, typed):
    """Read --pretrained-path before any data: refuse a model of another domain than `task`'s and flags typed
    (`typed`) with values that contradict it; set the other architecture flags of resolved `args` to its values."""
    cp_path = args.pretrained_path
    old = read(cp_path)["model_config"]
    data_flag = task.data_flag
    data = "the digits demo" if args.digits else f"{data_flag} {flag_value(args, data_flag)}"
    check_domain(cp_path, old, task, data)
    for flag, where in ARCHITECTURE_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        if flag in typed:
            value = getattr(args, dest)
            _check_typed(cp_path, old, flag, max(value, 0) if dest == "rproj_size" else value)
        elif _value(old, where) is not None:
            setattr(args, dest, _value(old, where))


def pretrained_config(cp_path, state, config, typed):
    """The model_config of a fine-tuning run: the checkpoint's architecture, this run's classes and head.

    `config`: what the run's flags and data give (train.model_config plus frontend / image_input);
    `typed`: the flags typed on the command line. UserError on a contradiction.
    """
    from e2e_verification.frontend import FrontEnd

    old = state["model_config"]
    for flag, where in ARCHITECTURE_FLAGS.items():
        if flag in typed:
            _check_typed(cp_path, old, flag, _value(config, where))
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
    """A new VerifierModel for `config`'s classes with the encoder and learned distance of checkpoint `cp_path`."""
    state = read(cp_path)
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
