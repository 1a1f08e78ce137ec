from benchmarks.overload.run import main

raise SystemExit(main())
