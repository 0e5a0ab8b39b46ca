from latentdiff.cli import main

raise SystemExit(main())
