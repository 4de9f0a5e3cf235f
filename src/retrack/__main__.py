from retrack.cli import main

raise SystemExit(main())
