from automodel.config import all_key_paths
from automodel.config.docs import config_reference
from tests.helpers import REPO


def test_docs_config_md_is_generated_from_the_schema():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_reference(), "regenerate: automodel config docs > docs/config.md"


def test_every_key_is_documented_with_a_doc_line():
    text = config_reference()
    for path in all_key_paths():
        if path.startswith("data.validation."):
            path = path.replace("data.validation.", "data.train.")  # one table for both splits
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{path}` |")), None)
        assert line is not None, path
        assert line.rstrip(" |").split("|")[-1].strip(), f"{path} has no doc"
