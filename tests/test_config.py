import pytest

from spavl_kedro.config import validate_parameters


def test_base_parameters_are_valid(params):
    validated = validate_parameters(params)
    assert len(validated["generate"].responders) >= 4


def test_bad_values_are_named_by_key(params):
    params["generate"]["responders"][0]["refusal_rate"] = 1.5
    params["align"]["dpo"]["lora_target_modules"] = ["lm_head"]
    params["split"]["validation_fractoin"] = 0.2
    with pytest.raises(ValueError) as err:
        validate_parameters(params)
    message = str(err.value)
    assert "generate.responders.0.refusal_rate" in message
    assert "lm_head" in message
    assert "split.validation_fractoin" in message


def test_kind_needs_its_fields(params):
    params["generate"]["responders"][1] = {"name": "remote", "kind": "transformers"}
    with pytest.raises(ValueError, match="responder 'remote': kind 'transformers' needs model"):
        validate_parameters(params)
