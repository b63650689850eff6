"""The offline forensics job: scan, recovery, repair, audit, calibration, export, report.

torch's OpenMP threads spin while they wait for one another. Beside another busy process on a small machine
(a shared build runner) a spinning thread holds the core its peer needs: a 10-class scan took 2.97x its time
alone beside one busy loop, against 1.45x with passive waiting, which costs about 15 % alone
(``bench/bench_scan.py --part contention``, docs/lab/scan.md). So passive waiting is set here, before anything
loads torch; a value the user set wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
