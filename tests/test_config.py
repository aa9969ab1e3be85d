import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softar import config
from softar.config import Config, ConfigError


def test_defaults_validate_and_round_trip():
    cfg = config.load(None, [])
    assert config.from_dict(cfg.to_dict()) == cfg


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 2\n[train]\nlr = 3e-4\ndevice = "cpu"\n')
    cfg = config.load(path, ["model.n_layer=3", "train.max_iters=7", "data.dir=some/where", "model.bias=true"])
    assert (cfg.model.n_layer, cfg.train.lr, cfg.train.max_iters) == (3, 3e-4, 7)
    assert cfg.data.dir == "some/where" and cfg.model.bias is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layers=3", "unknown config key model.n_layers"),
        ("optim.lr=1", "unknown config section 'optim'"),
        ("model.n_layer=two", "model.n_layer: expected int, got str"),
        ("model.n_layer=2.5", "model.n_layer: expected int, got float"),
        ("model.bias=1", "model.bias: expected bool, got int"),
        ("train.lr=-1e-3", "train.lr: must be positive"),
        ("model.n_head=5", "model.n_head: 5 does not divide model.d_model=128"),
        ("model.pos_emb=alibi", "model.pos_emb: expected one of 'learned', 'rope'"),
        ("train.min_lr=1.0", "train.min_lr: must be in"),
        ("model.dropout=1.0", "model.dropout: must be in"),
        ("nodot=3", "expected section.key=value"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    with pytest.raises(ConfigError, match="not a valid config file"):
        config.load(bad)
    code = tmp_path / "code.toml"
    code.write_text('[model]\nn_layer = "__import__(\'os\').system(\'echo hi\')"\n')
    with pytest.raises(ConfigError, match="model.n_layer: expected int, got str"):
        config.load(code)


def test_resolve_fills_derived_values():
    cfg = config.resolve(config.load(None, ["train.max_iters=50"]), vocab_size=65)
    assert (cfg.model.vocab_size, cfg.model.d_embed, cfg.train.lr_decay_iters) == (65, 128, 50)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        config.resolve(config.load(None, ["model.vocab_size=10"]), vocab_size=65)


_scalar = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([(s, k) for s, v in Config().to_dict().items() for k in v]), _scalar)
def test_any_single_value_is_accepted_or_rejected_with_its_key(key, value):
    """Property: every key/value either builds a valid config or raises a ConfigError naming that key."""
    section, name = key
    raw = {section: {name: value}}
    try:
        cfg = config.from_dict(raw)
    except ConfigError as e:
        assert f"{section}.{name}" in str(e)  # as the key that failed, or in the rule that names it
    else:
        assert getattr(getattr(cfg, section), name) == value


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["train.max_iters", "train.eval_interval", "task.max_stage", "task.thoughts_per_step"]),
       value=st.one_of(st.integers(0, 2**40), st.sampled_from([2**31, 2**31 + 1, 10**11])),
       mode=st.sampled_from(["thoughts", "pause", "cot"]))
def test_what_resolve_derives_loads_again(key, value, mode):
    """Property: a config that resolves is one that --resume, eval and inspect load again (its saved dict), so a
    derived value (lr_decay_iters, ckpt_interval, task.stage_iters) never outgrows the checks a written one gets;
    anything else is refused at the start, naming a key."""
    try:
        cfg = config.resolve(config.load(None, ["task.name='prosqa'", f"task.mode='{mode}'", f"{key}={value}"]), 133)
    except ConfigError as e:
        assert "train." in str(e) or "task." in str(e)
        return
    assert config.from_dict(cfg.to_dict()) == cfg
