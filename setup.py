from setuptools import find_packages, setup

setup(
    name="ucad",
    version="0.1.0",
    description="UCAD: unsupervised continual anomaly detection with contrastively-learned prompts",
    packages=find_packages(include=["ucad", "ucad.*", "segment_anything_prep", "segment_anything_prep.*"]),
    py_modules=["run_ucad"],
    python_requires=">=3.9",
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt")
                      if line.split("#")[0].strip() and not line.startswith("pytest")],
    # faiss-gpu replaces faiss-cpu (both install the module `faiss`): pip uninstall faiss-cpu, then pip install .[gpu]
    extras_require={"gpu": ["faiss-gpu>=1.7.4"]},
    entry_points={"console_scripts": [
        "ucad=ucad.cli.run:main",
        "ucad-predict=ucad.predict:main",
        "ucad-evaluate=ucad.evaluate:main",
        "ucad-demo-data=ucad.demo.data:main",
        "ucad-structure-maps=segment_anything_prep.make_structure_maps:main",
    ]},
)
