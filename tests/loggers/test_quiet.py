"""Quiet by default: libraries' records and warnings go to the run's debug log while a run is open, and everything is
as it was afterwards."""

import logging
import warnings

from automodel.loggers.quiet import libraries_to_file


def test_library_messages_go_to_the_debug_log_and_come_back_after(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # transformers as a user has it once imported (its console handler on): the state to restore
    deepspeed_like = logging.getLogger("DeepSpeed")
    console = logging.StreamHandler()
    deepspeed_like.addHandler(console)
    filters, transformers_handlers = list(warnings.filters), list(logging.getLogger("transformers").handlers)
    try:
        with libraries_to_file(tmp_path, rank=0) as path:
            late = logging.StreamHandler()  # what a library attaches when imported during the run
            deepspeed_like.addHandler(late)
            deepspeed_like.warning("Setting accelerator to CPU")
            logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
            warnings.warn("a python warning", UserWarning)
            deepspeed_like.removeHandler(late)
        logged = path.read_text()
        assert path == tmp_path / "logs" / "debug.log"
        for text in ("Setting accelerator to CPU", "a transformers warning", "a python warning"):
            assert text in logged
        captured = capsys.readouterr()
        assert "Setting accelerator" not in captured.out + captured.err
        assert "a transformers warning" not in captured.out + captured.err

        deepspeed_like.warning("after the run")
        assert "after the run" not in path.read_text()
        assert console in deepspeed_like.handlers and not deepspeed_like.filters
        assert warnings.filters == filters
        assert set(logging.getLogger("transformers").handlers) == set(transformers_handlers)
    finally:
        deepspeed_like.removeHandler(console)
