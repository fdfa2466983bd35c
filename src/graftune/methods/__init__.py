"""Built-in methods: one import line per method file registers it."""

from graftune.methods import bottleneck  # noqa: F401
from graftune.methods import ia3  # noqa: F401
from graftune.methods import lora  # noqa: F401
from graftune.methods import partial  # noqa: F401
from graftune.methods import prefix  # noqa: F401
from graftune.methods import prompt  # noqa: F401
