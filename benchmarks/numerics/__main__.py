from benchmarks.numerics.run import main

raise SystemExit(main())
