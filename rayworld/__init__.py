"""rayworld: World Models trained on Ray.

Importing the package registers its environments with gymnasium, under the `rayworld/`
namespace (`gymnasium.make("rayworld/CarRacing-v0")`), as gymnasium's own packages do.
"""

from rayworld import envs  # noqa: F401  (registers the rayworld/ envs)
