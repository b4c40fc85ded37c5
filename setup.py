"""ament_python package definition (also pip-installable for the ROS-free core)."""

from glob import glob

from setuptools import find_packages, setup

package_name = "osop_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={package_name: ["assets/*", "assets/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.rviz")),
        ("share/" + package_name + "/weights", glob("weights/*.pt") + glob("weights/*.md")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="osop_ros developers",
    maintainer_email="osop-ros@example.com",
    description="One-shot 6D pose estimation of unseen objects from their CAD model (OSOP) for ROS 2.",
    license="Apache-2.0",
    # colcon test runs pytest when the package declares it as a test dependency; `tests_require` is
    # ignored by current setuptools, the ament_python convention is the `test` extra.
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "osop = osop_ros.cli:main",
            "osop_node = osop_ros.ros.node:main",
        ],
    },
)
