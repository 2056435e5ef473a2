// One entry point per command; each lives in its own cmd_*.cc and returns the exit code.
// argv[0] is the command name ("create", "info", ...).
#pragma once

namespace vimgfs::cli {

int RunCreate(int argc, char** argv);
int RunInfo(int argc, char** argv);
int RunCheck(int argc, char** argv);
int RunConvert(int argc, char** argv);
int RunCompare(int argc, char** argv);
int RunMap(int argc, char** argv);
int RunResize(int argc, char** argv);
int RunSnapshot(int argc, char** argv);
int RunRebase(int argc, char** argv);
int RunCommit(int argc, char** argv);
int RunAmend(int argc, char** argv);
int RunBitmap(int argc, char** argv);
int RunMeasure(int argc, char** argv);
int RunDd(int argc, char** argv);
int RunBench(int argc, char** argv);
int RunRun(int argc, char** argv);
// The mount: argv[0] is "mount" or the program name (shorthand form).
int RunMount(int argc, char** argv);

}  // namespace vimgfs::cli
