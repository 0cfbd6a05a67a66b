"""Deployment profiles: each one's Definitions load without a GPU or the network, and pick the
resources it documents."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from pydantic import ValidationError

from dagster_project.definitions import build_definitions
from dagster_project.profiles import PROFILE_DIR, ProfileError, build_llm, build_resources
from unicorn_assets.instructions import InstructionConfig
from unicorn_resources.llm import LlamaCppLLM, OpenAILLM, VllmLLM

PROFILES = sorted(p.name.removesuffix(".yaml") for p in PROFILE_DIR.iterdir()
                  if p.name.endswith(".yaml"))


@pytest.fixture
def offline(monkeypatch):
    """No network, and none of the environment that would change a profile's values."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a profile tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in list(os.environ):
        if name.startswith(("UNICORN_", "AWS_")):
            monkeypatch.delenv(name)


def test_the_three_documented_profiles_exist():
    assert {"local", "gpu", "cluster"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_definitions_load_without_gpu_or_network(name, offline):
    defs = build_definitions(name)
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("unicorn_shard_job")
    assert "vllm" not in sys.modules
    if "torch" in sys.modules:
        assert not sys.modules["torch"].cuda.is_initialized()


def test_local_profile(offline):
    resources = build_definitions("local").resources
    assert isinstance(resources["llm"], LlamaCppLLM)
    assert resources["llm"].cache_path == "data/llm_cache.sqlite"
    assert resources["io_manager"].base_uri == "data"


@pytest.mark.parametrize("name", ["gpu", "cluster"])
def test_gpu_profiles_name_the_real_clip_and_sdxl(name, offline):
    resources = build_definitions(name).resources
    clip, diffusion = resources["clip"], resources["diffusion"]
    assert (clip.model_name, clip.pretrained) == ("ViT-L-14-336", "openai")
    assert diffusion.base_model_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert not diffusion.tiny_random


def test_gpu_profile_renders_and_selects_as_synthvlm(offline):
    """The public SynthVLM code's renders (60 steps, guidance 20, best of 5) and the paper's
    selection (top 100K by max(cos, 0) + 0.5 * SSIM) are the gpu profile's job defaults."""
    defs = build_definitions("gpu")
    diffusion = defs.resources["diffusion"]
    assert (diffusion.steps, diffusion.guidance_scale, diffusion.high_noise_frac) == (60, 20.0, 0.8)

    shard_job = defs.resolve_job_def("synthvlm_job")  # per shard: the config of any partition
    render = dg.validate_run_config(
        shard_job, shard_job.partitioned_config.get_run_config_for_partition_key("any"))
    assert render["ops"]["synthetic_images"]["config"]["images_per_caption"] == 5
    corpus = dg.validate_run_config(defs.resolve_job_def("synthvlm_corpus_job"))
    selection = corpus["ops"]["synthvlm_selection"]["config"]
    assert (selection["score_lambda"], selection["top_k"]) == (0.5, 100000)
    assert defs.resources["quality_gates"].synthvlm_min_median_clip_cosine_clipped == 0.0


def test_gpu_profile_runs_the_vllm_engine(offline):
    llm = build_definitions("gpu").resources["llm"]
    assert isinstance(llm, VllmLLM)
    assert llm.engine_kwargs() == {"model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel_size": 1,
                                   "gpu_memory_utilization": 0.85, "max_model_len": 4096,
                                   "dtype": "bfloat16"}
    assert llm.cache_path == "data/llm_cache.sqlite"


def test_cluster_profile_uses_a_fleet_s3_and_env_secrets(offline):
    resources = build_definitions("cluster").resources
    llm, io = resources["llm"], resources["io_manager"]
    assert isinstance(llm, OpenAILLM) and len(llm.base_urls) >= 2
    assert isinstance(llm.api_key, dg.EnvVar) and llm.api_key.env_var_name == "UNICORN_LLM_API_KEY"
    assert llm.cache_path.startswith("/shared/") and llm.cache_journal_mode == "delete"
    assert io.base_uri.startswith("s3://")
    assert isinstance(io.s3.access_key_id, dg.EnvVar)
    assert isinstance(io.s3.secret_access_key, dg.EnvVar)
    assert resources["seeds"].location.startswith("s3://")


def test_profile_is_chosen_by_environment(offline, monkeypatch):
    monkeypatch.setenv("UNICORN_PROFILE", "gpu")
    assert isinstance(build_definitions().resources["llm"], VllmLLM)
    monkeypatch.setenv("UNICORN_PROFILE", "nope")
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        build_definitions()


def test_cache_lives_beside_local_data_and_must_be_named_for_s3(tmp_path):
    local = build_resources({"storage": {"base_uri": str(tmp_path)}, "llm": {"backend": "fake"}})
    assert local["llm"].cache_path == f"{tmp_path}/llm_cache.sqlite"
    explicit = build_llm({"backend": "fake", "cache_path": "/mnt/c.sqlite"}, "s3://b/p")
    assert explicit.cache_path == "/mnt/c.sqlite"
    assert not build_llm({"backend": "fake", "cache_enabled": False}, "s3://b/p").cache_enabled
    with pytest.raises(ProfileError, match="llm.cache_path: storage is 's3://b/p'"):
        build_llm({"backend": "fake"}, "s3://b/p")


def test_unknown_llm_backend_is_refused():
    with pytest.raises(ProfileError, match=r"llm\.backend = 'vlm' is not a backend; did you mean "
                       r"'vllm'\? \(valid: fake, llama_cpp, openai, transformers, vllm\)"):
        build_llm({"backend": "vlm"})


# --- every setting checked where it is read -----------------------------------------------------

def _load_file(tmp_path, monkeypatch, text: str) -> dg.Definitions:
    """The Definitions of a profile file of one's own, loaded as `dagster dev` loads them."""
    path = tmp_path / "my.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(path))
    return build_definitions()


# The cases measured in issue 10: each was accepted silently and ran with a default.
MISSPELT = [
    ("llm: {backnd: fake}",
     (r"my\.yaml: llm\.backnd is not a setting; did you mean llm\.backend\? \(valid: backend, "
      r"cache_enabled, cache_journal_mode, cache_path, chat_format, model_path, n_batch, n_ctx, "
      r"n_threads\)$")),
    ("qualty_gates: {caption_max_reject_rate: 0.3}",
     (r"my\.yaml: qualty_gates is not a setting; did you mean quality_gates\? \(valid: automation, "
      r"clip, .*stage2, storage, synthvlm\)$")),
    ("quality_gates: {caption_max_reject_rte: 0.3}",
     (r"my\.yaml: quality_gates\.caption_max_reject_rte is not a setting; did you mean "
      r"quality_gates\.caption_max_reject_rate\? \(valid: .*caption_max_reject_rate, ")),
    ("storage: {base_urii: /mnt/unicorn}",
     (r"my\.yaml: storage\.base_urii is not a setting; did you mean storage\.base_uri\? "
      r"\(valid: base_uri, catalog_path, .*s3\)$")),
    ("seeds: {s3: {regoin: eu-west-1}}",
     r"my\.yaml: seeds\.s3\.regoin is not a setting; did you mean seeds\.s3\.region\?"),
    ("automation: {nightly: {crn: '0 3 * * *'}}",
     r"my\.yaml: automation\.nightly\.crn is not a setting; did you mean automation\.nightly\.cron\?"),
    ("llm: {backend: openai, model: m, base_urls: [u], max_in_flite: 8}",
     r"my\.yaml: llm\.max_in_flite is not a setting; did you mean llm\.max_in_flight\?"),
]


@pytest.mark.parametrize(("text", "message"), MISSPELT)
def test_a_misspelt_key_is_refused_with_the_nearest_valid_one(text, message, tmp_path, offline,
                                                                  monkeypatch):
    with pytest.raises(ProfileError, match=message):
        _load_file(tmp_path, monkeypatch, text)


def test_a_key_without_a_near_match_lists_the_valid_ones(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: clip\.zzz is not a setting; remove it, or "
                       r"use a setting of clip \(valid: backend, batch_size, cache_dir, "):
        _load_file(tmp_path, monkeypatch, "clip: {zzz: 1}")


OUT_OF_RANGE = [
    ("llm: {n_ctx: -2048}", r"llm\.n_ctx = -2048 is out of range: must be between 256 and 131072$"),
    ("llm: {backend: vllm, model: m, gpu_memory_utilization: 1.5}",
     r"llm\.gpu_memory_utilization = 1\.5 is out of range: must be more than 0 and at most 1$"),
    ("quality_gates: {caption_max_reject_rate: 9}",
     r"quality_gates\.caption_max_reject_rate = 9 is out of range: must be between 0 and 1$"),
    ("diffusion: {resolution: 100}",
     r"diffusion\.resolution = 100 is out of range: must be between 64 and 4096, a multiple of 8$"),
    ("stage2: {temperature: 3}", r"stage2\.temperature = 3 is out of range: must be between 0 and 2$"),
    ("clip: {batch_size: 0}", r"clip\.batch_size = 0 is out of range: must be between 1 and 65536$"),
    ("automation: {new_shard_sensor: {max_shards_per_tick: 0}}",
     (r"automation\.new_shard_sensor\.max_shards_per_tick = 0 is out of range: must be between 1 "
      r"and 10000$")),
]


@pytest.mark.parametrize(("text", "message"), OUT_OF_RANGE)
def test_a_number_out_of_range_is_refused_with_the_range(text, message, tmp_path, offline,
                                                         monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: " + message):
        _load_file(tmp_path, monkeypatch, text)


def test_the_bounds_hold_wherever_the_resource_class_is_used():
    """n_ctx: -2048 made llama.cpp allocate about 21 GB; the class refuses it itself too."""
    with pytest.raises(ValidationError, match="greater than or equal to 256"):
        LlamaCppLLM(n_ctx=-2048)
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        InstructionConfig(temperature=3.0)  # a run's own Stage 2 config has the same bounds


def test_every_problem_of_a_file_is_listed_one_per_line(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError) as err:
        _load_file(tmp_path, monkeypatch, "llm: {n_ctx: -1, backnd: fake}\nqualty_gates: {}\n")
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{tmp_path}/my.yaml: ") for line in lines)


def test_settings_that_contradict_each_other_are_refused(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: stage2: qa_pairs_min \(5\) is above "
                       r"qa_pairs_max \(2\); raise qa_pairs_max or lower qa_pairs_min"):
        _load_file(tmp_path, monkeypatch, "stage2: {qa_pairs_min: 5, qa_pairs_max: 2}")
    with pytest.raises(ProfileError, match=r"my\.yaml: quality_gates: caption_min_median_words "
                       r"\(50\) is above caption_max_median_words \(40\)"):
        _load_file(tmp_path, monkeypatch,
                   "quality_gates: {caption_min_median_words: 50, caption_max_median_words: 40}")


def test_a_section_must_be_a_mapping(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: llm = 'fake' is not valid: a section is a "
                       r"mapping of settings \(name: value\), not str"):
        _load_file(tmp_path, monkeypatch, "llm: fake")


def test_a_missing_setting_of_the_backend_is_named(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: llm\.base_urls is missing: backend openai "
                       r"needs it"):
        _load_file(tmp_path, monkeypatch, "llm: {backend: openai, model: m}")


def test_a_misspelt_op_setting_in_run_config_is_refused(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: run_config\.unicorn_shard_job\.ops\."
                       r"expand_captions\.config\.temprature is not a setting; did you mean "
                       r"run_config\.unicorn_shard_job\.ops\.expand_captions\.config\.temperature\?"):
        _load_file(tmp_path, monkeypatch, "run_config: {unicorn_shard_job: {ops: "
                   "{expand_captions: {config: {temprature: 0.5}}}}}")
    with pytest.raises(ProfileError, match=r"run_config names unknown job\(s\) \['unicorn_shard_jb'\]; "
                       r"run_config\.unicorn_shard_jb: did you mean run_config\.unicorn_shard_job\?"):
        _load_file(tmp_path, monkeypatch, "run_config: {unicorn_shard_jb: {}}")
    defs = _load_file(tmp_path, monkeypatch, "run_config: {unicorn_shard_job: {ops: "
                      "{expand_captions: {config: {temperature: 0.5}}}}}")
    assert defs.resolve_job_def("unicorn_shard_job")


def test_a_backend_chosen_by_the_environment_drops_the_files_settings_of_another_backend(
        tmp_path, offline, monkeypatch):
    """UNICORN_LLM_BACKEND=fake over a llama_cpp profile: its model_path and n_ctx belong to
    llama_cpp, not misspellings of fake's settings; a key no backend has is still refused."""
    text = ("llm: {backend: {env: UNICORN_LLM_BACKEND, default: llama_cpp}, n_ctx: 4096, "
            "model_path: /models/x.gguf}")
    monkeypatch.setenv("UNICORN_LLM_BACKEND", "fake")
    llm = _load_file(tmp_path, monkeypatch, text).resources["llm"]
    assert type(llm).__name__ == "FakeLLM"
    with pytest.raises(ProfileError, match=r"llm\.n_ctxx is not a setting"):
        _load_file(tmp_path, monkeypatch, text.replace("n_ctx:", "n_ctxx:"))
    monkeypatch.delenv("UNICORN_LLM_BACKEND")  # the file's own choice: its keys are checked
    with pytest.raises(ProfileError, match=r"llm\.words_per_completion is not a setting"):
        _load_file(tmp_path, monkeypatch, text.replace("n_ctx:", "words_per_completion:"))


def test_a_bad_environment_override_is_refused_naming_the_variable(offline, monkeypatch):
    monkeypatch.setenv("UNICORN_LLM_BACKEND", "vlm")
    with pytest.raises(ProfileError, match=r"local\.yaml: llm\.backend = 'vlm' \(from environment "
                       r"variable UNICORN_LLM_BACKEND\) is not a backend; did you mean 'vllm'\? .*"
                       r"fix or unset UNICORN_LLM_BACKEND$"):
        build_definitions("local")
    monkeypatch.delenv("UNICORN_LLM_BACKEND")
    monkeypatch.setenv("UNICORN_SYNTHVLM", "maybe")
    with pytest.raises(ProfileError, match=r"local\.yaml: synthvlm\.enabled = 'maybe' \(from "
                       r"environment variable UNICORN_SYNTHVLM\) is not valid: .*boolean.*"
                       r"fix or unset UNICORN_SYNTHVLM$"):
        build_definitions("local")


def test_environment_overrides_are_typed_by_the_same_model(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("UNICORN_SYNTHVLM", "false")  # was bool("false"), i.e. on
    jobs = {job.name for job in build_definitions("local").resolve_all_job_defs()}
    assert "unicorn_shard_job" in jobs and "synthvlm_job" not in jobs
    monkeypatch.setenv("UNICORN_SYNTHVLM", "true")
    jobs = {job.name for job in build_definitions("local").resolve_all_job_defs()}
    assert "synthvlm_job" in jobs
    monkeypatch.setenv("UNICORN_LLM_CACHE", str(tmp_path / "c.sqlite"))
    monkeypatch.setenv("UNICORN_DATA_DIR", str(tmp_path / "data"))
    resources = build_definitions("local").resources
    assert resources["llm"].cache_path == str(tmp_path / "c.sqlite")
    assert resources["io_manager"].base_uri == str(tmp_path / "data")


def test_an_environment_reference_must_be_well_formed(tmp_path, offline, monkeypatch):
    with pytest.raises(ProfileError, match=r"my\.yaml: storage\.base_uri: write an environment "
                       r"reference as \{env: NAME\} or \{env: NAME, default: VALUE\}"):
        _load_file(tmp_path, monkeypatch, "storage: {base_uri: {env: UNICORN_DATA_DIR, dflt: x}}")


def test_a_profile_name_is_a_known_name_never_a_path(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("UNICORN_PROFILE", "gpuu")
    with pytest.raises(ProfileError, match=r"unknown profile 'gpuu'; did you mean 'gpu'\?"):
        build_definitions()
    monkeypatch.setenv("UNICORN_PROFILE", "../profiles/local")
    with pytest.raises(ProfileError, match="unknown profile '../profiles/local'"):
        build_definitions()
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match=r"UNICORN_PROFILE_FILE=.*nope\.yaml: no such file"):
        build_definitions()


def test_the_cli_prints_a_profile_error_without_a_traceback(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("llm: {backnd: fake}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNICORN_")}
    env.update(UNICORN_PROFILE_FILE=str(path), DAGSTER_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", "from dagster_project.cli import app; app()",
                           "shards"], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2
    assert f"{path}: llm.backnd is not a setting; did you mean llm.backend?" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_llm2clip_backend_is_a_profile_choice(tmp_path, offline, monkeypatch):
    from unicorn_resources.llm2clip import Llm2ClipResource

    defs = _load_file(tmp_path, monkeypatch, "clip: {backend: llm2clip, llm_path: /m/llm, "
                      "clip_path: /m/clip}")
    clip = defs.resources["clip"]
    assert isinstance(clip, Llm2ClipResource)
    assert (clip.max_length, clip.trust_remote_code) == (512, False)  # read, not loaded
    assert clip._llm is None
    with pytest.raises(ProfileError, match=r"my\.yaml: clip\.clip_path is missing: backend "
                       r"llm2clip needs it"):
        _load_file(tmp_path, monkeypatch, "clip: {backend: llm2clip, llm_path: /m/llm}")
    with pytest.raises(ProfileError, match=r"clip\.long_text = 'chunk' is not one of "
                       r"'truncate', 'chunk_mean'; did you mean 'chunk_mean'\?"):
        _load_file(tmp_path, monkeypatch, "clip: {backend: open_clip, long_text: chunk}")


@pytest.mark.parametrize("name", ["gpu", "cluster"])
def test_the_commented_llm2clip_block_of_the_gpu_profiles_loads(name, tmp_path, offline,
                                                                  monkeypatch):
    """The paper's encoder, offered commented out: uncommented, it is a valid clip section."""
    import yaml

    from unicorn_resources.llm2clip import Llm2ClipResource

    lines = (PROFILE_DIR / f"{name}.yaml").read_text().splitlines()
    start = lines.index("# clip:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:].replace("<commit hash>", "0123456789abcdef"))
    section = yaml.safe_load("\n".join(block))["clip"]
    profile = {**yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text()), "clip": section,
               "synthvlm": {"enabled": False}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("UNICORN_PROFILE_FILE", str(tmp_path / "my.yaml"))
    clip = build_definitions().resources["clip"]
    assert isinstance(clip, Llm2ClipResource) and clip.max_length == 512
    assert build_definitions(name).resources["clip"].long_text == "chunk_mean"


def test_the_gpu_profile_states_the_transfer_and_export_formats(offline):
    """The paper's transfer and the trainer formats are in the gpu profile's corpus-job config."""
    job = build_definitions("gpu").resolve_job_def("unicorn_corpus_job")
    ops = dg.validate_run_config(job, {})["ops"]
    assert ops["modality_statistics"]["config"]["transfer"] == {"method": "mean_shift"}
    for op in ("pretrain_dataset", "instruct_dataset"):
        assert ops[op]["config"]["formats"] == ["llava", "unicorn"]


@pytest.mark.parametrize(("text", "error"), [
    ("{modality_statistics: {config: {transfer: {method: mean_shift_to_zero}}}}",
     r"run_config\.unicorn_corpus_job: .*transfer:method"),
    ("{pretrain_dataset: {config: {formats: [llava, pickle]}}}",
     r"run_config\.unicorn_corpus_job: .*formats\[1\]"),
])
def test_an_unknown_transfer_method_or_export_format_is_refused(tmp_path, offline, monkeypatch,
                                                                text, error):
    with pytest.raises(ProfileError, match=error):
        _load_file(tmp_path, monkeypatch, f"run_config: {{unicorn_corpus_job: {{ops: {text}}}}}")
