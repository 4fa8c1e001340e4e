"""The Hydra config: composition, schemas (typos and types fail at compose time), and one-line value errors."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import enhance_long
from enhance_long.config import ConfigError, job_dirname, validate
from enhance_long.methods.catalog import knob_specs
from enhance_long.runner import configured_variant, prepare_job, variants_to_run

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_composes_to_the_documented_run():
    cfg = compose_config()
    assert (cfg.model.name, cfg.rope.name, cfg.logn.enabled, cfg.attention.name) == (
        "smollm2_135m",
        "consistent_ntk",
        True,
        "sdpa",
    )
    assert (cfg.task.name, cfg.data.name, cfg.logger.name) == ("perplexity", "canterbury", "none")
    assert validate(cfg, list(enhance_long.METHODS)) == [4096, 8192, 16384]
    assert cfg.name == "perplexity"


def test_design_example_runs_one_length():
    cfg = compose_config("rope=consistent_ntk", "ctx=32768")
    assert validate(cfg, list(enhance_long.METHODS)) == [32768]


def test_every_rope_option_lists_its_knobs_at_the_catalogue_defaults_and_composes_with_every_knob():
    files = sorted((CONF / "rope").glob("*.yaml"))
    assert {f.stem for f in files} == set(enhance_long.METHODS), "one rope option per method of the catalogue"
    for f in files:
        values = yaml.safe_load(f.read_text())
        assert values.pop("defaults") == ["rope_schema", "_self_"]
        assert values.pop("name") == f.stem
        assert values == enhance_long.METHODS[f.stem], f"{f.name} must list exactly {f.stem}'s knobs, at their defaults"
        assert set(compose_config(f"rope={f.stem}").rope) == {"name", *knob_specs()}, "every knob composes"


def test_every_yaml_is_headed_by_the_command_that_uses_it():
    mine = [*CONF.glob("*.yaml"), *(CONF / "hydra").rglob("*.yaml"), *(ROOT / "experiments").glob("quick.yaml")]
    mine += [p for g in ("rope", "logn", "attention", "task", "logger") for p in (CONF / g).glob("*.yaml")]
    for path in mine:
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
        assert lines[0].startswith("# python run.py"), path
        for line in lines[1:]:
            body = line.strip()
            if body and not body.startswith(("#", "-", "defaults:")) and not body.endswith(":"):
                assert " # " in line, f"{path}: key without a comment: {line!r}"


@pytest.mark.parametrize("rope", ["none", "dynamic_ntk", "consistent_ntk"])
@pytest.mark.parametrize("alpha", [1, 4])
def test_product_sweep_composes_and_passes_only_the_knobs_a_method_takes(rope, alpha):
    cfg = compose_config(f"rope={rope}", f"rope.alpha={alpha}", "ctx=8192")
    method, ignored = configured_variant(cfg, enhance_long.METHODS)
    assert set(method.knobs) == set(enhance_long.METHODS[rope])
    if rope == "none":
        assert method.knobs == {} and ignored == [f"rope.alpha={float(alpha)}"]
    else:
        assert method.knobs["alpha"] == alpha and ignored == []


def test_jobs_differing_only_in_ignored_knobs_share_their_result_keys():
    keys = [{item.key for item in prepare_job(compose_config("rope=none", f"rope.alpha={a}")).work} for a in (1, 2, 4)]
    assert keys[0] == keys[1] == keys[2]
    other = {item.key for item in prepare_job(compose_config("rope=ntk", "rope.alpha=2", "baseline=false")).work}
    assert not other & keys[0]


def test_baseline_is_the_stock_model_and_is_not_doubled():
    methods, _ = variants_to_run(compose_config("baseline=true"), enhance_long.METHODS)
    assert [m.label for m in methods] == ["none", "consistent_ntk(alpha=2,bucket=256,schedule=per_query)+logn"]
    methods, _ = variants_to_run(compose_config("baseline=true", "rope=none", "logn=off"), enhance_long.METHODS)
    assert [m.label for m in methods] == ["none"]


@pytest.mark.parametrize(
    "override",
    ["ctxx=4096", "rope.alpah=2", "task.strde=512", "model.nmae=x"],
)
def test_a_typo_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config(override)


@pytest.mark.parametrize("override", ["ctx=abc", "rope.alpha=two", "task.buckets=1.5", "ctxs=[4096,big]"])
def test_a_wrong_type_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(override)


def test_an_unknown_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="Could not find 'rope/ntkk'"):
        compose_config("rope=ntkk")


@pytest.mark.parametrize("override", ["variant=rerope_lgon", "experiment=leaderbord"])
def test_an_unknown_variant_or_experiment_fails_instead_of_measuring_the_default(override):
    """variant and experiment default to none; a misspelt one must not be skipped as a missing optional config
    (that would measure the default method under the name the user meant)."""
    group, name = override.split("=")
    with pytest.raises(ConfigCompositionException, match=f"Could not find '{group}/{name}'"):
        compose_config(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ctx=0"], "ctx has 0; a context length must be a positive number of tokens"),
        (["ctxs=[4096,-1]"], "ctxs has -1"),
        (["ctxs=[]"], "ctxs=[] measures nothing"),
        (["rope.alpha=0"], "rope.alpha=0.0 is invalid; it must be a number > 0"),
        (["rope=ntk", "rope.alpha=-2"], "rope.alpha=-2.0 is invalid"),
        (["rope.bucket=0"], "rope.bucket=0 is invalid; it must be an integer >= 1"),
        (["rope.name=mystery"], "rope=mystery is unknown; choose one of none, linear"),
        (["logn.len=1"], "logn.len=1 is invalid"),
        (["ctx=1024", "task.stride=2048"], "task.stride=2048 is larger than ctx=1024"),
        (["task.mode=streaming"], "task.mode=streaming is unknown; choose sliding or cached"),
        (["task=passkey", "task.depths=[0,1.5]"], "task.depths has 1.5; a depth is a fraction of the filler in [0, 1]"),
        (["task=passkey", "task.depths=[-0.1]"], "task.depths has -0.1"),
        (["task=passkey", "task.trials=0"], "task.trials=0 is invalid"),
        (["attention.name=fast"], "attention=fast is unknown; choose one of eager, sdpa"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode=sometimes is unknown"),
        (["data=local"], "data=local (source local) needs data.path"),
        (["reuse=[no/such/board]"], "reuse has no/such/board, which is not a results.jsonl file or a folder"),
        (["reuse=[conf]"], "reuse has conf, which is not a results.jsonl file or a folder holding one"),
        (["reuse=[README.md]"], "reuse has README.md, which is not a results.jsonl file"),  # nor a CSV
    ],
)
def test_nonsense_values_fail_with_one_line(overrides, message):
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg, list(enhance_long.METHODS))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_value_exits_before_any_model_is_loaded(monkeypatch, tmp_path):
    import enhance_long.models

    monkeypatch.setattr(enhance_long.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    from enhance_long.runner import run

    with pytest.raises(SystemExit, match=r"^enhance-long: rope.alpha=-1.0 is invalid"):
        run(compose_config("rope.alpha=-1"), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_experiment_quick_composes_and_overrides_the_root():
    cfg = compose_config("experiment=quick")
    assert cfg.name == "quick" and cfg.ctxs == [1024, 2048]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm", "slurm_example"])
def test_launchers_compose(launcher):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher


def test_job_dirname_is_deterministic_and_safe():
    assert job_dirname("") == "default"
    assert job_dirname("data.path=/a/b,rope=ntk") == "data.path=_a_b,rope=ntk"
    long = ",".join(f"k{i}=v{i}" for i in range(60))
    assert len(job_dirname(long)) < 160 and job_dirname(long) == job_dirname(long)
    assert job_dirname(long) != job_dirname(long + ",x=1")


@pytest.mark.parametrize(
    "task,ctxs,trials",
    [("perplexity", [8192, 16384, 24576, 32768], None), ("passkey", [16384], 1), ("ruler", [8192, 16384], None)],
)
def test_leaderboard_gives_each_task_its_own_lengths_and_knobs(task, ctxs, trials):
    from enhance_long.config import task_settings

    cfg = task_settings(compose_config("experiment=leaderboard", f"task={task}", "variant=self_extend"))
    assert validate(cfg, list(enhance_long.METHODS)) == ctxs
    assert (cfg.name, cfg.logn.enabled, cfg.rope.name, cfg.baseline) == ("leaderboard", False, "self_extend", False)
    if trials is not None:
        assert cfg.task.trials == trials and list(cfg.task.depths) == [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.mark.parametrize(
    ("variant", "rope", "knobs", "logn"),
    [
        ("original", "consistent_ntk", {"schedule": "per_forward", "bucket": 1}, True),
        ("consistent_ntk_logn", "consistent_ntk", {"schedule": "per_query", "bucket": 256}, True),
        ("rerope_logn", "rerope", {"window": 2048}, True),
        ("yarn", "yarn", {"factor": 2.0}, False),
    ],
)
def test_variants_set_the_method_its_knobs_and_logn(variant, rope, knobs, logn):
    cfg = compose_config(f"variant={variant}")
    assert cfg.rope.name == rope and cfg.logn.enabled is logn
    assert {k: cfg.rope[k] for k in knobs} == knobs


def test_every_variant_composes_and_validates():
    for path in sorted((CONF / "variant").glob("*.yaml")):
        cfg = compose_config(f"variant={path.stem}")
        assert validate(cfg) == [4096, 8192, 16384], path.stem
        assert path.read_text().splitlines()[1].startswith(f"# python run.py variant={path.stem}"), path


def test_per_task_overrides_must_be_config_keys():
    from enhance_long.config import task_settings

    cfg = compose_config("+per_task.perplexity={ctxz: [1024]}")
    with pytest.raises(ConfigError, match="per_task.perplexity sets ctxz, which are not config keys"):
        task_settings(cfg)
