from dpt_scale.cli import main

raise SystemExit(main())
