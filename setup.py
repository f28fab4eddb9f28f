from setuptools import find_packages, setup

setup(
    name="flowseg",
    version="0.1.0",
    description="FlowSeg: Dynamic Semantic Guidance for LLM-Conditioned Segmentation (Detectron2 project)",
    package_dir={"": "projects/FlowSeg"},
    packages=find_packages(where="projects/FlowSeg", include=["flowseg", "flowseg.*"]),
    python_requires=">=3.9",
)
