"""Opt-in autoloader, for clusters where Ray's `worker_process_setup_hook` is taken (a `ray job submit` runtime
env that sets its own hook, say) and OpenRLHF is not patched.

    python -m openrlhf_lsc.integration.autoload install      # on every node, into the Python that runs Ray
    # then add "OPENRLHF_LSC_AUTOLOAD": "1" to the job's runtime env env_vars

`install` writes `openrlhf_lsc_autoload.pth` into site-packages. Python runs its one line at every interpreter
start: with OPENRLHF_LSC_AUTOLOAD=1 in the environment it registers the plugin (`setup_worker`, the same function
as the Ray hook); without it, it costs one dict lookup. `uninstall` removes the file.
"""

import argparse
import os
import sysconfig

PTH = "openrlhf_lsc_autoload.pth"
LINE = ('import os; os.environ.get("OPENRLHF_LSC_AUTOLOAD") == "1" and '
        '__import__("openrlhf_lsc.integration").integration.setup_worker()\n')


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.integration.autoload", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--site", default=sysconfig.get_paths()["purelib"],
                   help="the site-packages folder to write into (default: %(default)s)")
    args = p.parse_args(argv)
    path = os.path.join(args.site, PTH)
    if not os.path.isdir(args.site):
        p.error(f"--site {args.site}: no such folder")
    if args.action == "install":
        with open(path + ".tmp", "w") as f:
            f.write(LINE)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}: processes started with OPENRLHF_LSC_AUTOLOAD=1 register openrlhf_lsc")
    elif os.path.exists(path):
        os.remove(path)
        print(f"removed {path}")


if __name__ == "__main__":
    main()
