from tierstack.cli.main import main

raise SystemExit(main())
