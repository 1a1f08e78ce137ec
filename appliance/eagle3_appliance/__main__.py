from eagle3_appliance.cli import main

main()
