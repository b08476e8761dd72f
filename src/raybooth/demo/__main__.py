import sys

from raybooth.demo.run import main

sys.exit(main())
