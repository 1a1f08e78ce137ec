from loadtest.bench_transport._main import main

raise SystemExit(main())
