# sandgate's Ruby prelude (`ruby -r`, before the program): stdout written as it is printed (an
# exec streams its output), and the sandbox's files as the working directory, as on every runtime.
$stdout.sync = true
Dir.chdir("/work")
