from benchmarks.transport.run import main

raise SystemExit(main())
