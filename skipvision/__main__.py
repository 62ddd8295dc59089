from skipvision.cli import main

raise SystemExit(main())
