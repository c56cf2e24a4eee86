"""Never used: under TRITON_INTERPRET=1 Triton interprets kernels rather than
compiling them; Triton only requires the class to exist."""

from triton.backends.compiler import BaseBackend, GPUTarget


class CpuBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return "multiverse-test-triton-cpu"

    def parse_options(self, options: dict) -> object:
        raise NotImplementedError("kernels run under TRITON_INTERPRET=1")

    def add_stages(self, stages: dict, options: object, language) -> None:
        raise NotImplementedError("kernels run under TRITON_INTERPRET=1")

    def load_dialects(self, context) -> None:
        pass

    def get_module_map(self) -> dict:
        return {}
