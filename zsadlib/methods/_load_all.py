"""Import every built-in method module so that it registers itself."""
from . import winclip  # noqa: F401
from . import april_gan  # noqa: F401
from . import anomalyclip  # noqa: F401
from . import genclip  # noqa: F401
from . import crane  # noqa: F401
from . import vip2clip  # noqa: F401
from . import adaclip  # noqa: F401
