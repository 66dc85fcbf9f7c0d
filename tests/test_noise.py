"""The known import noise of torchao on a CPU machine is filtered out of the log; everything else still passes."""

from __future__ import annotations

import logging

import lcc_harness  # noqa: F401 - installs the filter


def test_torchaos_known_lines_are_dropped_and_others_pass(caplog):
    with (
        caplog.at_level(logging.WARNING),
        caplog.at_level(
            logging.WARNING, logger="torchao"
        ),  # torchao may have set its own level when imported
        caplog.at_level(logging.WARNING, logger="torch.utils._pytree"),
    ):
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an "
            "opaque value type. Calling register_constant() on Enum subclasses is deprecated and will be an error"
        )
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library: /x")
        logging.getLogger("torchao").warning("a real torchao warning")
        logging.getLogger("torch.utils._pytree").warning("another pytree message")
    assert [r.getMessage() for r in caplog.records] == ["a real torchao warning", "another pytree message"]
