from offline_compress.cli import main

raise SystemExit(main())
