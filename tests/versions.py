"""FastCLIP-v0..v3 as FastCLIPConfig keyword arguments (the README's loss flags), for the tests."""

VERSIONS = {
    "v0": dict(temperature_scheme="global_learnable"),
    "v1": dict(temperature_scheme="global_constant"),
    "v2": dict(temperature_scheme="individual_learnable"),
    "v3": dict(temperature_scheme="global_learnable", multiply_tau=True),
}
