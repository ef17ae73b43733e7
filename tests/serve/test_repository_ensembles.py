"""Ensembles defined in the repository: Triton's ensemble folder (platform "ensemble"), parsed by
serve.repository, served by the hub beside --ensemble, with their fusion and temperatures."""

import numpy as np
import pytest

from serve_helpers import LABELS, png_bytes
from serve import images
from serve.backends.fake import fake_probabilities, write_fake_model
from serve.ensemble import Ensemble, rank
from serve.errors import ConfigError, ModelNotFoundError
from serve.hub import ModelHub
from serve.repository import ModelRepository, load_ensemble, parse_temperatures, write_ensemble

PICTURE = np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    write_fake_model(root, "small", labels=LABELS, seed=1, size=(32, 32))
    write_fake_model(root, "wide", labels=LABELS, seed=2, size=(48, 40))
    write_fake_model(root, "other", labels=LABELS, seed=3)
    write_ensemble(root, "pair", ["small", "wide"], fusion="geometric", temperatures={"wide": 2.5})
    return root


def test_written_ensemble_is_a_triton_ensemble_folder_listed_apart_from_models(repo):
    text = (repo / "pair" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in text and "ensemble_scheduling" in text and 'model_name: "wide"' in text
    assert (repo / "pair" / "1").is_dir()  # Triton's (empty) version folder
    repository = ModelRepository(repo)
    assert repository.names() == ["other", "small", "wide"]
    assert repository.ensemble_names() == ["pair"]
    entry = repository.ensemble("pair")
    assert entry.members == ("small", "wide") and entry.fusion == "geometric"
    assert entry.temperatures == {"wide": 2.5}
    assert Ensemble.from_entry(entry) == Ensemble("pair", ("small", "wide"), "geometric", (1.0, 2.5))
    with pytest.raises(ModelNotFoundError, match="ensembles there: pair"):
        repository.ensemble("small")
    with pytest.raises(ConfigError, match="is an ensemble"):
        repository.entry("pair")


def test_hub_serves_repository_ensembles_with_their_fusion_and_temperatures(repo):
    hub = ModelHub(repo).load()
    try:
        assert set(hub.names()) == {"other", "small", "wide", "pair"}
        assert hub.find("pair").ready
        data = png_bytes(PICTURE)
        result = hub.classify(data, ["pair"], top=4)
        assert [m.model for m in result.models] == ["small", "wide"]
        assert [m.input_size for m in result.models] == [(32, 32), (48, 40)]  # one resize per input size
        picture = images.decode(data)
        probs = [fake_probabilities(images.resize(picture, size)[None], 10, seed)
                 for size, seed in (((32, 32), 1), ((48, 40), 2))]
        scores, order = rank(probs, "geometric", temperatures=(1.0, 2.5))
        (fused,) = result.ensembles
        assert fused.fusion == "geometric"
        assert [i for _, i, _ in fused.predictions] == list(order[0, :4])
        np.testing.assert_allclose([p for _, _, p in fused.predictions], scores[0, order[0, :4]], rtol=1e-5)
        # the temperatures matter: without them the scores differ
        plain, _ = rank(probs, "geometric")
        assert not np.allclose(plain, scores)
    finally:
        hub.close()


def test_command_line_ensemble_replaces_the_repository_one_and_models_select(repo):
    hub = ModelHub(repo, ensembles=[Ensemble.parse("pair=small,other:majority")]).load()
    try:
        assert hub.find("pair").ensemble.fusion == "majority"
    finally:
        hub.close()
    hub = ModelHub(repo, models=["other"]).load()  # not named: not served, its members not loaded
    try:
        assert set(hub.names()) == {"other"}
    finally:
        hub.close()
    hub = ModelHub(repo, models=["pair"]).load()  # named: served through its members
    try:
        assert set(hub.names()) == {"small", "wide", "pair"}
    finally:
        hub.close()


def test_bad_ensemble_folders_are_reported(repo, tmp_path, caplog):
    bad = repo / "broken"
    bad.mkdir()
    (bad / "config.pbtxt").write_text('name: "broken"\nplatform: "ensemble"\n')
    with pytest.raises(ConfigError, match="needs ensemble_scheduling"):
        load_ensemble(bad)
    hub = ModelHub(repo).load()  # not strict: the others are served, the reason is logged
    try:
        assert "broken" not in hub.names() and hub.find("pair").ready
        assert "ensemble broken in the repository is not served" in caplog.text
    finally:
        hub.close()
    with pytest.raises(ConfigError, match="needs ensemble_scheduling"):
        ModelHub(repo, strict=True)
    (bad / "config.pbtxt").write_text(
        'name: "broken"\nplatform: "ensemble"\nensemble_scheduling { step { model_name: "small" } '
        'step { model_name: "ghost" } }\nparameters { key: "temperatures" value { string_value: "nobody=2" } }\n')
    with pytest.raises(ConfigError, match=r"names \['nobody'\], which are not steps"):
        load_ensemble(bad)
    (bad / "config.pbtxt").write_text(
        'name: "broken"\nplatform: "ensemble"\nensemble_scheduling { step { model_name: "small" } '
        'step { model_name: "ghost" } }\n')
    with pytest.raises(ConfigError, match="'ghost' is not in repository"):
        ModelHub(repo, models=["broken"]).load()
    with pytest.raises(ConfigError, match="expected MEMBER=TEMPERATURE"):
        parse_temperatures("a=1,b")
    with pytest.raises(ConfigError, match="holds a model, not an ensemble"):
        write_ensemble(repo, "small", ["wide"])
